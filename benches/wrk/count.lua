-- wrk script for the syscall-count pass: a scenario's requests, stopping after a fixed number of
-- responses, so that `perf stat` counts the server's syscalls over a known number of requests
-- while a client as fast as the timed run's (wrk itself) drives it.
-- Usage: wrk ... -s count.lua URL -- RESPONSES DEPTH BODY_SIZE close|keep-alive
local limit, seen = 0, 0
local batch

function init(args)
   limit = tonumber(args[1]) or 10000
   local depth = tonumber(args[2]) or 1
   local size = tonumber(args[3]) or 0
   if args[4] == "close" then
      wrk.headers["Connection"] = "close"
   end
   if size > 0 then
      -- The same bytes post.lua sends.
      wrk.method = "POST"
      wrk.headers["Content-Type"] = "application/octet-stream"
      wrk.body = string.rep("x", size)
   end
   if depth > 1 then
      local parts = {}
      for i = 1, depth do
         parts[i] = wrk.format()
      end
      batch = table.concat(parts)
      -- Defined only when pipelining: without request() wrk keeps its static, faster path.
      request = function()
         return batch
      end
   end
end

function response(status, headers, body)
   seen = seen + 1
   if seen == limit then
      -- thread:stop() would still leave wrk sleeping out its -d and let the responses already
      -- read in this loop iteration through; exiting here makes the count exact and the pass
      -- short. wrk then prints no summary: this line is what the harness reads.
      io.write(string.format("count-pass: %d responses\n", seen))
      os.exit(0)
   end
end
