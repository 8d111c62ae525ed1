-- wrk script: a POST with a body of `size` bytes (default 4096) to the echo app.
-- Usage: wrk ... -s post.lua URL -- SIZE
-- No request() function is defined, so wrk formats the request once and resends it as is:
-- the client side stays as cheap as a plain GET run.
function init(args)
   local size = tonumber(args[1]) or 4096
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/octet-stream"
   wrk.body = string.rep("x", size)
end
