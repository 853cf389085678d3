-- How a claimed image ends: its worker reports it (complete), its lease lapses (reap), or its
-- worker keeps it (renew). Leases are granted by claim.lua.

-- A running image ends (outcome succeeded | failed | cancelled) or goes back to pending (requeue).
-- `obj`: for a succeeded image, the JSON of where its bytes are (image store key, size, type, ...).
local function settle(qid, idx, rec, outcome, err, now, ttl, user_ttl, obj)
  local q = qkey(qid)
  local m = meta(q)
  redis.call('ZREM', LEASES_KEY, qid .. '|' .. idx)
  -- Progress belongs to the run that ends here (progress.lua).
  if rec.pv then redis.call('DEL', q .. PREVIEW_KEY_SUFFIX .. idx) end
  local share = step_share(rec.ps, rec.pn)
  if share > 0 then redis.call('HINCRBYFLOAT', q, 'pf', -share) end
  rec.ps, rec.pn, rec.pt, rec.pv = nil, nil, nil, nil
  if tonumber(redis.call('HINCRBY', INFLIGHT_KEY, m.model, -1)) < 0 then
    redis.call('HSET', INFLIGHT_KEY, m.model, 0)
  end
  if m.status == QueueState.CANCELLED then outcome = Outcome.CANCELLED end
  if outcome == Outcome.REQUEUE then
    rec.s = ImageStatus.PENDING
    rec.w = nil
    put_rec(q, idx, rec)
    redis.call('LPUSH', q .. ':retry', idx)
    touch(q, q .. ':retry')
    redis.call('HINCRBY', q, 'running', -1)
    add_running(qid, -1)
    redis.call('HINCRBY', q, 'pending', 1)
    add_pending(qid, m, 1)
    sched_add(qid, m.uk, m.model, m.priority)
    emit(qid, m.uk, {type = 'image', index = tonumber(idx), status = ImageStatus.PENDING}, now)
    return ImageStatus.PENDING
  end
  -- The other outcomes are image statuses, and the names of the queue's and the totals' counts.
  rec.s = outcome
  rec.t1 = now
  if outcome == Outcome.SUCCEEDED then
    if obj ~= '' then
      for k, v in pairs(cjson.decode(obj)) do rec[k] = v end
    end
    rec.e = nil
  elseif outcome == Outcome.FAILED then
    rec.e = err
  end
  put_rec(q, idx, rec)
  redis.call('HINCRBY', q, 'running', -1)
  add_running(qid, -1)
  redis.call('HINCRBY', q, outcome, 1)
  redis.call('HINCRBY', STATS_KEY, outcome, 1)
  local bucket = tp_key(m.model, math.floor(now / THROUGHPUT_BUCKET_MS))
  redis.call('INCR', bucket)
  redis.call('EXPIRE', bucket, THROUGHPUT_BUCKET_TTL_SECONDS)
  emit(qid, m.uk, {type = 'image', index = tonumber(idx), status = outcome, error = rec.e, attempt = rec.a}, now)
  return finalize_if_done(qid, now, ttl, user_ttl)
end

-- @script complete
-- ARGV: qid, idx, attempt, outcome, error, ttl, user_ttl, object record JSON ('' for none)
local qid, idx, attempt = ARGV[1], ARGV[2], tonumber(ARGV[3])
local q = qkey(qid)
if redis.call('EXISTS', q) == 0 then
  redis.call('ZREM', LEASES_KEY, qid .. '|' .. idx)
  settle_gone(qid)
  return Discarded.GONE
end
local rec = get_rec(q, idx)
if (not rec) or rec.s ~= ImageStatus.RUNNING or tonumber(rec.a) ~= attempt then return Discarded.STALE end
return settle(qid, idx, rec, ARGV[4], ARGV[5], server_now(), tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8])

-- @script reap
-- ARGV: limit, max_lost, ttl, user_ttl. Re-queues (or fails) images whose lease lapsed.
local limit, max_lost = tonumber(ARGV[1]), tonumber(ARGV[2])
local ttl, user_ttl = tonumber(ARGV[3]), tonumber(ARGV[4])
local now = server_now()
local expired = redis.call('ZRANGEBYSCORE', LEASES_KEY, '-inf', now, 'LIMIT', 0, limit)
local models = {}
for _, member in ipairs(expired) do
  redis.call('ZREM', LEASES_KEY, member)
  local sep = string.find(member, '|', 1, true)
  local qid, idx = string.sub(member, 1, sep - 1), string.sub(member, sep + 1)
  local q = qkey(qid)
  local rec = (redis.call('EXISTS', q) == 1) and get_rec(q, idx) or nil
  if rec and rec.s == ImageStatus.RUNNING then
    rec.l = (rec.l or 0) + 1
    local worker = rec.w or '?'
    if rec.l >= max_lost then
      settle(qid, idx, rec, Outcome.FAILED, 'worker ' .. worker .. ' was lost while generating this image (' ..
        rec.l .. ' times)', now, ttl, user_ttl, '')
    else
      settle(qid, idx, rec, Outcome.REQUEUE, '', now, ttl, user_ttl, '')
      models[#models + 1] = redis.call('HGET', q, 'model')
    end
  elseif redis.call('EXISTS', q) == 0 then
    settle_gone(qid)
  end
end
-- Queues that expired with no worker to meet them (say, a model nobody serves): a few each round.
for _, qid in ipairs(redis.call('HRANDFIELD', OPEN_KEY, OPEN_SWEEP)) do
  if redis.call('EXISTS', qkey(qid)) == 0 then settle_gone(qid) end
end
return models

-- @script renew
-- ARGV: lease_ms, safety_ttl, members... Extends leases that still exist (a reaped lease stays reaped),
-- and the lifetime of the queues they belong to.
local expiry, safety = server_now() + tonumber(ARGV[1]), tonumber(ARGV[2])
local args = {}
local queues = {}
for i = 3, #ARGV do
  args[#args + 1] = expiry
  args[#args + 1] = ARGV[i]
  local bar = string.find(ARGV[i], '|', 1, true)
  local qid = string.sub(ARGV[i], 1, bar - 1)
  queues[qid] = true
  -- A running image's latest preview lasts as long as the image runs, however long its provider
  -- goes quiet (a long decode after the last step): the status keeps naming it.
  redis.call('EXPIRE', qkey(qid) .. PREVIEW_KEY_SUFFIX .. string.sub(ARGV[i], bar + 1), PROGRESS_TTL_SECONDS)
end
if #args == 0 then return 0 end
for qid in pairs(queues) do
  local uk = redis.call('HGET', qkey(qid), 'uk')
  if uk then keep_alive(qid, uk, safety) end
end
return redis.call('ZADD', LEASES_KEY, 'XX', 'CH', unpack(args))
