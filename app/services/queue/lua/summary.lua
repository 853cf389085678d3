-- Reads that must agree with each other, in one round trip.

-- @script summary
-- ARGV: qid, buckets. One round trip for a status summary: the meta hash, and for an
-- unfinished queue the schedule facts that position and ETA need, with the server's time (ms).
local qid, nbuckets = ARGV[1], tonumber(ARGV[2])
local now = server_now()
local bucket = math.floor(now / THROUGHPUT_BUCKET_MS)
local q = qkey(qid)
local flat = redis.call('HGETALL', q)
if #flat == 0 then return {} end
local m = meta(q)
local extra = {}
if not m.finished_at then
  local pend = redis.call('HMGET', pend_key(m.model), unpack(PRIORITIES))
  local r = ring(m.model, m.priority)
  local tp = {}
  for i = 0, nbuckets do tp[#tp + 1] = tp_key(m.model, bucket - i) end
  local rates = redis.call('MGET', unpack(tp))
  extra = {pend[1] or '0', pend[2] or '0', pend[3] or '0', redis.call('ZRANK', r, m.uk) or -1, redis.call('ZCARD', r),
    redis.call('ZRANK', uring(m.model, m.priority, m.uk), qid) or -1}
  for i = 1, #rates do extra[#extra + 1] = rates[i] or '0' end
end
return {flat, extra, now}

-- @script throughput
-- ARGV: model, buckets. A model's completions per throughput bucket over the window, newest
-- first, then the server's time (ms).
local model, nbuckets = ARGV[1], tonumber(ARGV[2])
local now = server_now()
local bucket = math.floor(now / THROUGHPUT_BUCKET_MS)
local tp = {}
for i = 0, nbuckets do tp[#tp + 1] = tp_key(model, bucket - i) end
local out = redis.call('MGET', unpack(tp))
for i = 1, #out do out[i] = out[i] or '0' end
out[#out + 1] = now
return out
