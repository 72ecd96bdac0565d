-- wrk script for benchmarks/compare_mms.py: POSTs request bodies read from files, cycling
-- through them, and prints one JSON line ("WRK_JSON {...}") when the run ends.
--
--   WRK_BODIES=list.txt WRK_CONTENT_TYPE=image/png wrk -t1 -c8 -d10s -s post_files.lua URL
--
-- WRK_BODIES names a file listing one body file per line. WRK_SERVER_MS=1 also parses
-- "latency_ms" (the server's own time) out of every response body; it is off for the
-- throughput runs, since a response() hook makes wrk hand every body to Lua.

local list = assert(os.getenv("WRK_BODIES"), "set WRK_BODIES")
local content_type = os.getenv("WRK_CONTENT_TYPE") or "image/png"
local want_server_ms = os.getenv("WRK_SERVER_MS") == "1"

local bodies = {}
for path in io.lines(list) do
  if path ~= "" then
    local f = assert(io.open(path, "rb"))
    bodies[#bodies + 1] = f:read("*a")
    f:close()
  end
end
assert(#bodies > 0, "no bodies in " .. list)

-- Main state: one entry per thread, so that done() can collect their figures.
local threads = {}
local thread_count = 0

function setup(thread)
  thread_count = thread_count + 1
  thread:set("thread_id", thread_count)
  threads[#threads + 1] = thread
end

-- Thread state.
local requests = {}
local next_index = 1
server_ms = {}
bad_bodies = 0

function init(args)
  for i, body in ipairs(bodies) do
    requests[i] = wrk.format("POST", nil, { ["Content-Type"] = content_type }, body)
  end
  -- Threads start at different bodies.
  next_index = ((thread_id or 1) - 1) * 97 % #requests + 1
end

function request()
  local r = requests[next_index]
  next_index = next_index % #requests + 1
  return r
end

if want_server_ms then
  function response(status, headers, body)
    if status == 200 then
      local ms = string.match(body, '"latency_ms"%s*:%s*([%d%.eE+-]+)')
      if ms then
        server_ms[#server_ms + 1] = tonumber(ms)
      else
        bad_bodies = bad_bodies + 1
      end
    end
  end
end

function done(summary, latency, _)
  local e = summary.errors
  local parts = {
    string.format('"requests":%d', summary.requests),
    string.format('"duration_s":%.3f', summary.duration / 1e6),
    string.format('"bytes":%d', summary.bytes),
    string.format(
      '"errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d,"status":%d}',
      e.connect, e.read, e.write, e.timeout, e.status
    ),
    string.format(
      '"latency_ms":{"p50":%.3f,"p90":%.3f,"p99":%.3f,"max":%.3f,"mean":%.3f}',
      latency:percentile(50) / 1000, latency:percentile(90) / 1000,
      latency:percentile(99) / 1000, latency.max / 1000, latency.mean / 1000
    ),
  }
  if want_server_ms then
    local values, bad = {}, 0
    for _, thread in ipairs(threads) do
      for _, v in ipairs(thread:get("server_ms") or {}) do
        values[#values + 1] = string.format("%.3f", v)
      end
      bad = bad + (thread:get("bad_bodies") or 0)
    end
    parts[#parts + 1] = '"server_ms":[' .. table.concat(values, ",") .. "]"
    parts[#parts + 1] = string.format('"unparsed_bodies":%d', bad)
  end
  io.write("WRK_JSON {" .. table.concat(parts, ",") .. "}\n")
end
