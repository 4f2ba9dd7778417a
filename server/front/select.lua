-- precision-serve's Envoy front, downstream filter on gRPC ModelInfer and HTTP /v2/models/M/infer
-- (server/front/config.py).
-- Reads the head of the serialised ModelInferRequest (model_name, model_version, the
-- "precision" parameter; inputs and outputs only to see whether they name shared memory)
-- without decoding tensors, and sets the header x-ps-route that the route table matches:
--   v:<variant>              a Triton-served variant asked for by name
--   m:<model>:<precision>    a logical model with a requested precision (parameter or header)
--   m:<model>                a logical model: its policy's routes
--   python                   everything else: the control plane (the Python gateway)
-- (HTTP: the same with an "h" in front: hv:, hm:, the HTTP clusters)
-- The catalog comes from the route's metadata (filter_metadata "envoy.filters.http.lua").
-- With a token set, the bearer token is checked before the body is read.

local HEAD_BYTES = 16384 -- the fields before the tensors' bytes fit in this (else: python)
local catalog = nil

local function varint(s, i)
  local value, scale = 0, 1
  while true do
    local b = s:byte(i)
    if b == nil or scale > 2 ^ 56 then
      return nil, i
    end
    i = i + 1
    value = value + (b % 128) * scale
    if b < 128 then
      return value, i
    end
    scale = scale * 128
  end
end

-- (key, string value or false when not a string) of a serialised parameters map entry
local function parameter(s)
  local key, value, i = nil, nil, 1
  while i <= #s do
    local tag, len
    tag, i = varint(s, i)
    if tag == nil or tag % 8 ~= 2 then
      return key, false
    end
    len, i = varint(s, i)
    if len == nil or i + len - 1 > #s then
      return key, false
    end
    local field = math.floor(tag / 8)
    if field == 1 then
      key = s:sub(i, i + len - 1)
    elseif field == 2 then
      local inner = s:sub(i, i + len - 1)
      local itag, j = varint(inner, 1)
      if itag == 26 then -- InferParameter.string_param (3, length-delimited)
        local ilen, k = varint(inner, j)
        value = ilen and inner:sub(k, k + ilen - 1) or false
      else
        value = false
      end
    end
    i = i + len
  end
  return key, value
end

-- model_name, model_version, precision parameter (nil: none; false: not a string), ok
local function read_head(s)
  if #s < 5 or s:byte(1) ~= 0 then
    return nil -- compressed or not a frame: the control plane answers
  end
  local name, version, precision = "", "", nil
  local i = 6
  while i <= #s do
    local tag, len
    tag, i = varint(s, i)
    if tag == nil or tag % 8 ~= 2 then
      return nil
    end
    local field = math.floor(tag / 8)
    if field >= 7 then -- raw_input_contents: the rest is tensor bytes
      return name, version, precision
    end
    len, i = varint(s, i)
    if len == nil then
      return nil
    end
    if i + len - 1 > #s then
      return nil -- the head did not fit in HEAD_BYTES
    end
    if field == 1 then
      name = s:sub(i, i + len - 1)
    elseif field == 2 then
      version = s:sub(i, i + len - 1)
    elseif field == 4 then
      local key, value = parameter(s:sub(i, i + len - 1))
      if key == "precision" then
        precision = value
      end
    elseif field == 5 or field == 6 then
      local at = s:find("shared_memory_region", i, true)
      if at ~= nil and at < i + len then
        return nil -- the regions live on the gateway's host
      end
    end
    i = i + len
  end
  return name, version, precision
end

local function bearer_ok(handle, token)
  local given = handle:headers():get("authorization") or ""
  local scheme, value = given:match("^(%S+)%s+(.-)%s*$")
  return scheme ~= nil and scheme:lower() == "bearer" and value == token
end

-- the route of a request for ``name`` with ``precision`` requested (nil: none); ``kind``: ""
-- for gRPC, "h" for HTTP (their own clusters and routes)
local function decide(handle, kind, name, precision)
  handle:headers():replace("x-ps-name", name) -- the variant's own name: no rewrite upstream
  if catalog.variants[name] then
    return kind .. "v:" .. name
  end
  local model = catalog.models[name]
  if model == nil then
    return "python" -- unknown names: NOT_FOUND in Triton's wording, from the control plane
  end
  if precision == nil then
    precision = handle:headers():get("x-precision")
  end
  if precision == nil or precision == "" then
    return kind .. "m:" .. name
  end
  precision = precision:lower():match("^%s*(.-)%s*$")
  if model[precision] then
    return kind .. "m:" .. name .. ":" .. precision
  end
  return "python"
end

local function route_grpc(handle)
  local body = handle:body()
  if body == nil then
    return "python"
  end
  local n = body:length()
  local name, version, precision = read_head(body:getBytes(0, math.min(n, HEAD_BYTES)))
  -- every model has the one version "1" (as the control plane answers): perf_analyzer's -x 1,
  -- a client's explicit version, go the same way; any other version: Triton's error, from Python
  if name == nil or (version ~= "" and version ~= "1") or precision == false then
    return "python"
  end
  return decide(handle, "", name, precision)
end

-- HTTP /v2/models/<name>[/versions/1]/infer: the JSON part (all of it, or the Inference-Header-Content-Length
-- bytes before binary tensors) is searched, not parsed: a "precision" or shared-memory
-- parameter, which only the control plane reads, sends the request there
local function route_http(handle, path)
  if not catalog.http then
    return "python"
  end
  local name = path:match("^/v2/models/([%w_.-]+)/infer$")
    or path:match("^/v2/models/([%w_.-]+)/versions/1/infer$")
  local json_length = tonumber(handle:headers():get("inference-header-content-length") or "")
  local body = handle:body()
  if name == nil or body == nil then
    return "python"
  end
  local n = body:length()
  local json = body:getBytes(0, math.min(json_length or n, n))
  if json:find('"precision"', 1, true) or json:find("shared_memory", 1, true) then
    return "python"
  end
  return decide(handle, "h", name, nil)
end

local function refuse(handle, grpc)
  local message = "missing or wrong bearer token (header 'authorization')"
  if grpc then
    handle:respond({
      [":status"] = "200",
      ["content-type"] = "application/grpc",
      ["grpc-status"] = "16",
      ["grpc-message"] = message,
    }, "")
  else
    handle:respond(
      { [":status"] = "401", ["content-type"] = "application/json" },
      '{"error":"' .. message .. '"}'
    )
  end
end

function envoy_on_request(handle)
  if catalog == nil then
    catalog = handle:metadata():get("catalog")
  end
  local path = handle:headers():get(":path")
  local grpc = path == "/inference.GRPCInferenceService/ModelInfer"
  local token = catalog.token
  if token ~= nil and token ~= "" and not bearer_ok(handle, token) then
    refuse(handle, grpc)
    return
  end
  local chosen -- reads the body: header objects taken before it are stale
  if grpc then
    chosen = route_grpc(handle)
  else
    chosen = route_http(handle, path)
  end
  handle:headers():replace("x-ps-route", chosen)
  handle:clearRouteCache()
end
