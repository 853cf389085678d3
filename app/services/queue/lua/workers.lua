-- The fleet: which workers are alive and how providers answered, by the server's clock.

-- @script register_worker
-- ARGV: name, info_json, ttl_ms. Returns the server's time (ms) when it registered.
local name, info, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local now = server_now()
redis.call('ZADD', WORKERS_KEY, now + ttl, name)
redis.call('SET', WORKER_KEY_PREFIX .. name, info, 'PX', ttl)
redis.call('ZREMRANGEBYSCORE', WORKERS_KEY, '-inf', now)
return now

-- @script live_workers
-- ARGV: none. The info of every worker whose presence has not lapsed, and the server's time (ms).
local now = server_now()
local names = redis.call('ZRANGEBYSCORE', WORKERS_KEY, now, '+inf')
local out = {now}
for _, name in ipairs(names) do
  local info = redis.call('GET', WORKER_KEY_PREFIX .. name)
  if info then out[#out + 1] = info end
end
return out

-- @script provider_note
-- ARGV: model, ok ('1'|'0'), error. How a model's provider answered lately, stamped by the server's
-- clock so that reports from different workers compare.
local key = P .. 'health:' .. ARGV[1]
if ARGV[2] == '1' then
  redis.call('HSET', key, 'ok_at', server_now())
else
  redis.call('HSET', key, 'error_at', server_now(), 'error', ARGV[3])
end
redis.call('EXPIRE', key, PROVIDER_HEALTH_TTL_SECONDS)
return 0
