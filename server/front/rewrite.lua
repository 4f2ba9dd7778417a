-- precision-serve's Envoy front, upstream filter of every variant's cluster (per attempt).
-- The cluster's header mutations (server/front/config.py) put x-ps-rewrite on the request: the
-- serialised ModelInferRequest{model_name: <variant>} in hex, appended to the client's message
-- (protobuf: the last value of a field wins) with the gRPC frame's length fixed; and
-- x-ps-reply on the response: the serialised ModelInferResponse{parameters: {precision}} in
-- hex, appended to Triton's reply the same way (what the Python path adds too).

local function unhex(s)
  return (s:gsub("..", function(c)
    return string.char(tonumber(c, 16))
  end))
end

local function frame(n)
  local b4 = n % 256
  n = math.floor(n / 256)
  local b3 = n % 256
  n = math.floor(n / 256)
  local b2 = n % 256
  local b1 = math.floor(n / 256)
  return string.char(0, b1, b2, b3, b4)
end

-- body + suffix, one gRPC message; false when the body is not one uncompressed message
local function append(body, suffix)
  if body == nil then
    return false
  end
  local n = body:length()
  if n < 5 then
    return false
  end
  local head = body:getBytes(0, 5)
  local len = ((head:byte(2) * 256 + head:byte(3)) * 256 + head:byte(4)) * 256 + head:byte(5)
  if head:byte(1) ~= 0 or len ~= n - 5 then
    return false
  end
  body:setBytes(frame(len + #suffix) .. body:getBytes(5, len) .. suffix)
  return true
end

-- HTTP: /v2/models/<name>/infer -> /v2/models/<variant>/infer
local function rewrite_path(headers)
  local variant = headers:get("x-ps-variant")
  if variant ~= nil and headers:get("x-ps-name") ~= variant then
    local path = headers:get(":path")
    headers:replace(":path", (path:gsub("^/v2/models/[^/]+/", "/v2/models/" .. variant .. "/", 1)))
  end
end

function envoy_on_request(handle)
  local headers = handle:headers()
  local rewrite = headers:get("x-ps-rewrite")
  if rewrite == nil then
    rewrite_path(headers)
    return
  end
  headers:remove("x-ps-rewrite")
  -- a later attempt of a chain (the route's first precision is not this cluster's): the reply
  -- says which precision was routed first, as the Python path's "fallback_from" does
  local first = headers:get("x-ps-first")
  if first ~= nil and first ~= headers:get("x-ps-precision") then
    handle:streamInfo():dynamicMetadata():set("precision-serve", "fallback", headers:get("x-ps-fallback"))
  end
  if headers:get("x-ps-name") == headers:get("x-ps-variant") then
    return -- asked for by its own name: nothing to rewrite, nothing to buffer
  end
  append(handle:body(), unhex(rewrite))
end

function envoy_on_response(handle)
  local headers = handle:headers()
  local reply = headers:get("x-ps-reply")
  if reply == nil then
    return
  end
  headers:remove("x-ps-reply")
  if headers:get("grpc-status") ~= nil then
    return -- trailers only: an error, no message to add to
  end
  local suffix = unhex(reply)
  local state = handle:streamInfo():dynamicMetadata():get("precision-serve")
  if state ~= nil and state.fallback ~= nil then
    suffix = suffix .. unhex(state.fallback)
  end
  append(handle:body(), suffix)
end
