"""digitserve inference service.

Kept import-light on purpose: the training code imports `service.store` and
`service.preprocessing` (the contracts they share) without pulling in Flask.
"""
