-- wrk script: pipelined GETs, `depth` requests in each write (default 16).
-- Usage: wrk ... -s pipeline.lua URL -- DEPTH
-- wrk parses the returned string to learn how many responses to await before the next write,
-- so one Lua call covers the whole batch.
local batch

function init(args)
   local depth = tonumber(args[1]) or 16
   local parts = {}
   for i = 1, depth do
      parts[i] = wrk.format("GET", wrk.path)
   end
   batch = table.concat(parts)
end

function request()
   return batch
end
