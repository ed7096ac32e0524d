-- wrk script: cycles through pre-built request bodies, one per request.
-- Environment: BODIES (a file of JSON bodies, one per line), URL_PATH (the POST path), HEADER_NAME / HEADER_VALUE
-- (one optional extra header). Every request is formatted once in init(), so request() only hands one back.
-- done() prints one line "RESULT {json}" with the counts and the latency percentiles (microseconds).

local reqs = {}
local n = 0
local i = 0

function init(args)
   local headers = { ["Content-Type"] = "application/json" }
   local name = os.getenv("HEADER_NAME")
   if name and name ~= "" then
      headers[name] = os.getenv("HEADER_VALUE")
   end
   local path = os.getenv("URL_PATH")
   for line in io.lines(os.getenv("BODIES")) do
      n = n + 1
      reqs[n] = wrk.format("POST", path, headers, line)
   end
   -- Threads start at different places in the list.
   i = (wrk.thread and tonumber(wrk.thread:get("offset") or 0) or 0) % n
end

function setup(thread)
   thread:set("offset", tostring(math.random(0, 1000000)))
end

function request()
   i = i % n + 1
   return reqs[i]
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'RESULT {"requests": %d, "duration_us": %d, "bytes": %d, "connect_errors": %d, "read_errors": %d, ' ..
      '"write_errors": %d, "status_errors": %d, "timeouts": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
      '"max_us": %d, "mean_us": %.1f}\n',
      summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
