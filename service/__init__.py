"""digitserve inference service: the Flask app (``service.app.create_app``), served
by gunicorn (``service/gunicorn.conf.py``). It reads models through ``store``."""
