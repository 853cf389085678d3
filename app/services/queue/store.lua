-- imagequeue's atomic state changes. Loaded by store.py, which prepends nothing: each script is
-- this file's PREAMBLE plus one section between "-- @script NAME" markers.
-- Key layout (store.py documents it too):
--   iq:q:{qid}          hash   queue meta and the five counts
--   iq:q:{qid}:spec     string immutable JSON spec (prompts, params, ...)
--   iq:q:{qid}:img      hash   index -> JSON record of an image that has left "never claimed"
--   iq:q:{qid}:retry    list   indexes to claim before the cursor (re-queued images)
--   iq:q:{qid}:blob     hash   index -> image bytes
--   iq:q:{qid}:ev       stream the queue's events
--   iq:u:{uk}:active / :hist   zsets of queue ids; iq:u:{uk}:ev stream; iq:u:{uk}:stats hash
--   iq:s:{model}:{prio}        zset ring of users with claimable work (score = last served)
--   iq:s:{model}:{prio}:{uk}   zset ring of that user's queues
--   iq:pend:{model}            hash prio -> claimable images
--   iq:inflight                hash model -> images being generated
--   iq:leases                  zset "qid|index" -> lease expiry (ms)
--   iq:backoff:{model}         string, present while a provider asked everyone to wait
--   iq:tp:{model}:{bucket}     int, completions in a 10 s bucket
--   iq:stats                   hash terminal status -> images ever finished so (for metrics)
--   iq:wh:due                  zset queue id -> when its webhook deliveries are next due (ms)
-- @preamble
local P = 'iq:'
local PRIOS = {'high', 'normal', 'low'}
local SUFFIXES = {'', ':spec', ':img', ':retry', ':blob', ':ev'}

local function qkey(qid) return P .. 'q:{' .. qid .. '}' end
local function ukey(uk) return P .. 'u:' .. uk end
local function ring(model, prio) return P .. 's:' .. model .. ':' .. prio end
local function uring(model, prio, uk) return ring(model, prio) .. ':' .. uk end

local function meta(q)
  local v = redis.call('HMGET', q, 'uk', 'model', 'priority', 'status', 'total', 'pending', 'running',
    'succeeded', 'failed', 'cancelled', 'finished_at', 'cursor', 'cut')
  if not v[1] then return nil end
  return {uk = v[1], model = v[2], priority = v[3], status = v[4], total = tonumber(v[5]),
    pending = tonumber(v[6]), running = tonumber(v[7]), succeeded = tonumber(v[8]),
    failed = tonumber(v[9]), cancelled = tonumber(v[10]), finished_at = v[11],
    cursor = tonumber(v[12]), cut = v[13]}
end

local function counts_of(q)
  local v = redis.call('HMGET', q, 'status', 'total', 'pending', 'running', 'succeeded', 'failed', 'cancelled')
  return {status = v[1], total = tonumber(v[2]), pending = tonumber(v[3]), running = tonumber(v[4]),
    succeeded = tonumber(v[5]), failed = tonumber(v[6]), cancelled = tonumber(v[7])}
end

local function emit(qid, uk, ev, now)
  ev.queue_id = qid
  ev.ts = now
  local c = counts_of(qkey(qid))
  ev.queue_status = c.status
  c.status = nil
  ev.counts = c
  local data = cjson.encode(ev)
  local q = qkey(qid)
  local id = redis.call('XADD', q .. ':ev', '*', 'd', data)
  if redis.call('HEXISTS', q, 'webhook') == 1 then redis.call('ZADD', P .. 'wh:due', 'NX', ev.ts, qid) end
  redis.call('XADD', ukey(uk) .. ':ev', 'MAXLEN', '~', 10000, '*', 'q', qid, 'i', id, 'd', data)
end

-- A member joining a ring goes to its front: a user who had nothing waiting is served next, so
-- a small batch starts within one image of any other user's big one (then takes its turn).
local function ring_join(key, member)
  if redis.call('ZSCORE', key, member) then return end
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  local score = first[2] and (tonumber(first[2]) - 1) or redis.call('INCR', P .. 'seq')
  redis.call('ZADD', key, score, member)
end

local function sched_add(qid, uk, model, prio)
  ring_join(uring(model, prio, uk), qid)
  ring_join(ring(model, prio), uk)
end

local function sched_remove(qid, uk, model, prio)
  local ur = uring(model, prio, uk)
  redis.call('ZREM', ur, qid)
  if redis.call('ZCARD', ur) == 0 then redis.call('ZREM', ring(model, prio), uk) end
end

-- HINCRBY that skips zero: Lua renders -0 as "-0", which Redis rejects as a non-integer.
local function incr(key, fieldname, delta)
  if delta ~= 0 then redis.call('HINCRBY', key, fieldname, delta) end
end

local function add_pending(m, delta)
  if delta == 0 then return end
  redis.call('HINCRBY', P .. 'pend:' .. m.model, m.priority, delta)
  redis.call('HINCRBY', ukey(m.uk) .. ':stats', 'pending', delta)
end

local function set_ttl(qid, ttl)
  local q = qkey(qid)
  for _, s in ipairs(SUFFIXES) do redis.call('EXPIRE', q .. s, ttl) end
end

local function finalize_if_done(qid, now, ttl, user_ttl)
  local q = qkey(qid)
  local m = meta(q)
  if m.pending > 0 or m.running > 0 or m.finished_at then return m.status end
  local status = m.status
  if status ~= 'cancelled' then
    if m.succeeded > 0 then status = 'completed'
    elseif m.failed > 0 then status = 'failed'
    else status = 'cancelled' end
  end
  redis.call('HSET', q, 'status', status, 'finished_at', now)
  set_ttl(qid, ttl)
  local u = ukey(m.uk)
  redis.call('ZREM', u .. ':active', qid)
  redis.call('ZADD', u .. ':hist', now, qid)
  for _, s in ipairs({':active', ':hist', ':ev', ':stats'}) do redis.call('EXPIRE', u .. s, user_ttl) end
  emit(qid, m.uk, {type = 'queue', status = status, final = true}, now)
  return status
end

local function get_rec(q, idx)
  local raw = redis.call('HGET', q .. ':img', idx)
  if not raw then return nil end
  return cjson.decode(raw)
end

-- A queue's side keys are created lazily; give each the queue's own remaining lifetime.
local function touch(q, key)
  if redis.call('TTL', key) == -1 then
    local t = redis.call('TTL', q)
    if t > 0 then redis.call('EXPIRE', key, t) end
  end
end

local function put_rec(q, idx, rec)
  redis.call('HSET', q .. ':img', idx, cjson.encode(rec))
  touch(q, q .. ':img')
end

-- A running image ends (outcome succeeded | failed | cancelled) or goes back to pending (requeue).
local function settle(qid, idx, rec, outcome, err, now, ttl, user_ttl, blob, ctype)
  local q = qkey(qid)
  local m = meta(q)
  redis.call('ZREM', P .. 'leases', qid .. '|' .. idx)
  if tonumber(redis.call('HINCRBY', P .. 'inflight', m.model, -1)) < 0 then
    redis.call('HSET', P .. 'inflight', m.model, 0)
  end
  if m.status == 'cancelled' then outcome = 'cancelled' end
  if outcome == 'requeue' then
    rec.s = 'pending'
    rec.w = nil
    put_rec(q, idx, rec)
    redis.call('LPUSH', q .. ':retry', idx)
    touch(q, q .. ':retry')
    redis.call('HINCRBY', q, 'running', -1)
    redis.call('HINCRBY', q, 'pending', 1)
    add_pending(m, 1)
    sched_add(qid, m.uk, m.model, m.priority)
    emit(qid, m.uk, {type = 'image', index = tonumber(idx), status = 'pending'}, now)
    return 'pending'
  end
  rec.s = outcome
  rec.t1 = now
  if outcome == 'succeeded' then
    redis.call('HSET', q .. ':blob', idx, blob)
    touch(q, q .. ':blob')
    rec.ct = ctype
    rec.e = nil
  elseif outcome == 'failed' then
    rec.e = err
  end
  put_rec(q, idx, rec)
  redis.call('HINCRBY', q, 'running', -1)
  redis.call('HINCRBY', q, outcome, 1)
  redis.call('HINCRBY', P .. 'stats', outcome, 1)
  local bucket = P .. 'tp:' .. m.model .. ':' .. math.floor(now / 10000)
  redis.call('INCR', bucket)
  redis.call('EXPIRE', bucket, 120)
  emit(qid, m.uk, {type = 'image', index = tonumber(idx), status = outcome, error = rec.e, attempt = rec.a}, now)
  return finalize_if_done(qid, now, ttl, user_ttl)
end

-- @script create
-- KEYS: none (ids in ARGV). ARGV: qid, uk, now, safety_ttl, meta_json, spec, idem_key, fingerprint,
-- idem_ttl, max_pending, max_active
local qid, uk, now, safety = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local fields = cjson.decode(ARGV[5])
local idem_key, fingerprint, idem_ttl = ARGV[7], ARGV[8], tonumber(ARGV[9])
local max_pending, max_active = tonumber(ARGV[10]), tonumber(ARGV[11])
if idem_key ~= '' then
  local prior = redis.call('GET', idem_key)
  -- A key whose queue is gone (deleted, or expired before the key) no longer names anything: the
  -- request is served as a new one and the key taken over.
  if prior then
    local p = cjson.decode(prior)
    if redis.call('EXISTS', qkey(p.q)) == 1 then
      if p.f ~= fingerprint then return {'conflict', p.q} end
      return {'replay', p.q}
    end
  end
end
local u = ukey(uk)
local total = tonumber(fields.total)
if max_active > 0 and redis.call('ZCARD', u .. ':active') >= max_active then
  return {'limit_active', tostring(max_active)}
end
local pend = tonumber(redis.call('HGET', u .. ':stats', 'pending') or '0')
if max_pending > 0 and pend + total > max_pending then
  return {'limit_pending', tostring(max_pending - pend)}
end
local q = qkey(qid)
local flat = {}
for k, v in pairs(fields) do
  flat[#flat + 1] = k
  flat[#flat + 1] = v
end
redis.call('HSET', q, unpack(flat))
redis.call('HSET', q, 'uk', uk, 'status', 'pending', 'pending', total, 'running', 0, 'succeeded', 0,
  'failed', 0, 'cancelled', 0, 'cursor', 0, 'created_at', now)
redis.call('SET', q .. ':spec', ARGV[6])
local m = meta(q)
sched_add(qid, uk, m.model, m.priority)
add_pending(m, total)
redis.call('ZADD', u .. ':active', now, qid)
emit(qid, uk, {type = 'queue', status = 'pending'}, now)
set_ttl(qid, safety)
for _, s in ipairs({':active', ':hist', ':ev', ':stats'}) do redis.call('EXPIRE', u .. s, safety) end
if idem_key ~= '' then
  redis.call('SET', idem_key, cjson.encode({q = qid, f = fingerprint}), 'EX', idem_ttl)
end
return {'created', qid}

-- @script claim
-- ARGV: worker, now, lease_ms, n, caps_json {model: cap}, models_json [..]
local worker, now, lease_ms, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local caps = cjson.decode(ARGV[5])
local models = cjson.decode(ARGV[6])
local out = {0, 0}
local claimed = 0
local wait_ms, capped = 0, 0
local blocked = {}
for _, model in ipairs(models) do
  local pt = tonumber(redis.call('PTTL', P .. 'backoff:' .. model))
  if pt > 0 then
    blocked[model] = true
    if wait_ms == 0 or pt < wait_ms then wait_ms = pt end
  end
end
for _, prio in ipairs(PRIOS) do
  for _, model in ipairs(models) do
    local r = ring(model, prio)
    while claimed < n and not blocked[model] do
      local cap = tonumber(caps[model] or 0)
      if cap > 0 and tonumber(redis.call('HGET', P .. 'inflight', model) or '0') >= cap then
        blocked[model] = true
        capped = 1
        break
      end
      local top = redis.call('ZRANGE', r, 0, 0)
      if #top == 0 then break end
      local uk = top[1]
      local ur = uring(model, prio, uk)
      local qtop = redis.call('ZRANGE', ur, 0, 0)
      if #qtop == 0 then
        redis.call('ZREM', r, uk)
      else
        local qid = qtop[1]
        local q = qkey(qid)
        local m = meta(q)
        local idx = nil
        if m and m.status ~= 'cancelled' and not m.finished_at then
          idx = redis.call('LPOP', q .. ':retry')
          if (not idx) and m.cut ~= '1' and m.cursor < m.total then
            idx = tostring(m.cursor)
            m.cursor = m.cursor + 1
            redis.call('HSET', q, 'cursor', m.cursor)
          end
        end
        if not idx then
          sched_remove(qid, uk, model, prio)
        else
          local more = redis.call('LLEN', q .. ':retry') > 0 or (m.cut ~= '1' and m.cursor < m.total)
          local seq = redis.call('INCR', P .. 'seq')
          if more then
            redis.call('ZADD', ur, seq, qid)
          else
            redis.call('ZREM', ur, qid)
          end
          if redis.call('ZCARD', ur) > 0 then
            redis.call('ZADD', r, seq, uk)
          else
            redis.call('ZREM', r, uk)
          end
          local rec = get_rec(q, idx) or {a = 0}
          rec.s = 'running'
          rec.a = (rec.a or 0) + 1
          rec.w = worker
          rec.t0 = now
          rec.t1 = nil
          rec.e = nil
          put_rec(q, idx, rec)
          redis.call('HINCRBY', q, 'pending', -1)
          redis.call('HINCRBY', q, 'running', 1)
          add_pending(m, -1)
          redis.call('HINCRBY', P .. 'inflight', model, 1)
          redis.call('ZADD', P .. 'leases', now + lease_ms, qid .. '|' .. idx)
          if m.status == 'pending' then
            redis.call('HSET', q, 'status', 'running', 'started_at', now)
            emit(qid, m.uk, {type = 'queue', status = 'running'}, now)
          end
          emit(qid, m.uk, {type = 'image', index = tonumber(idx), status = 'running', attempt = rec.a}, now)
          out[#out + 1] = qid
          out[#out + 1] = idx
          out[#out + 1] = rec.a
          claimed = claimed + 1
        end
      end
    end
  end
end
out[1] = wait_ms
out[2] = capped
return out

-- @script complete
-- ARGV: qid, idx, attempt, outcome, now, error, ttl, user_ttl, blob, content_type
local qid, idx, attempt = ARGV[1], ARGV[2], tonumber(ARGV[3])
local q = qkey(qid)
if redis.call('EXISTS', q) == 0 then return 'gone' end
local rec = get_rec(q, idx)
if (not rec) or rec.s ~= 'running' or tonumber(rec.a) ~= attempt then return 'stale' end
return settle(qid, idx, rec, ARGV[4], ARGV[6], tonumber(ARGV[5]), tonumber(ARGV[7]), tonumber(ARGV[8]),
  ARGV[9], ARGV[10])

-- @script reap
-- ARGV: now, limit, max_lost, ttl, user_ttl. Re-queues (or fails) images whose lease lapsed.
local now, limit, max_lost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local ttl, user_ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
local expired = redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', now, 'LIMIT', 0, limit)
local models = {}
for _, member in ipairs(expired) do
  redis.call('ZREM', P .. 'leases', member)
  local sep = string.find(member, '|', 1, true)
  local qid, idx = string.sub(member, 1, sep - 1), string.sub(member, sep + 1)
  local q = qkey(qid)
  local rec = (redis.call('EXISTS', q) == 1) and get_rec(q, idx) or nil
  if rec and rec.s == 'running' then
    rec.l = (rec.l or 0) + 1
    local worker = rec.w or '?'
    if rec.l >= max_lost then
      settle(qid, idx, rec, 'failed', 'worker ' .. worker .. ' was lost while generating this image (' ..
        rec.l .. ' times)', now, ttl, user_ttl, '', '')
    else
      settle(qid, idx, rec, 'requeue', '', now, ttl, user_ttl, '', '')
      models[#models + 1] = redis.call('HGET', q, 'model')
    end
  end
end
return models

-- @script renew
-- ARGV: expiry, members... Extends leases that still exist (a reaped lease stays reaped).
local expiry = ARGV[1]
local args = {}
for i = 2, #ARGV do
  args[#args + 1] = expiry
  args[#args + 1] = ARGV[i]
end
if #args == 0 then return 0 end
return redis.call('ZADD', P .. 'leases', 'XX', 'CH', unpack(args))

-- @script cancel
-- ARGV: qid, uk, now, ttl, user_ttl
local qid, uk, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local q = qkey(qid)
local m = meta(q)
if (not m) or m.uk ~= uk then return 'notfound' end
if m.status == 'cancelled' then return 'noop' end
if m.finished_at then return 'conflict' end
local cancelled = 0
local retry = redis.call('LRANGE', q .. ':retry', 0, -1)
for _, idx in ipairs(retry) do
  local rec = get_rec(q, idx) or {a = 0}
  rec.s = 'cancelled'
  rec.t1 = now
  put_rec(q, idx, rec)
  cancelled = cancelled + 1
end
redis.call('DEL', q .. ':retry')
if m.cut ~= '1' and m.cursor < m.total then cancelled = cancelled + (m.total - m.cursor) end
redis.call('HSET', q, 'cut', '1', 'status', 'cancelled', 'cancel_requested_at', now)
incr(q, 'pending', -cancelled)
incr(q, 'cancelled', cancelled)
incr(P .. 'stats', 'cancelled', cancelled)
add_pending(m, -cancelled)
sched_remove(qid, uk, m.model, m.priority)
emit(qid, uk, {type = 'queue', status = 'cancelled'}, now)
redis.call('PUBLISH', P .. 'cancel', qid)
finalize_if_done(qid, now, tonumber(ARGV[4]), tonumber(ARGV[5]))
return 'cancelled'

-- @script retry
-- ARGV: qid, uk, include_cancelled ('1'|'0'), now, safety_ttl
local qid, uk, with_cancelled, now, safety = ARGV[1], ARGV[2], ARGV[3] == '1', tonumber(ARGV[4]), tonumber(ARGV[5])
local q = qkey(qid)
local m = meta(q)
if (not m) or m.uk ~= uk then return {'notfound', 0} end
if not m.finished_at then return {'conflict', 0} end
local again = 0
local from_failed, from_cancelled = 0, 0
local recs = redis.call('HGETALL', q .. ':img')
for i = 1, #recs, 2 do
  local rec = cjson.decode(recs[i + 1])
  if rec.s == 'failed' or (with_cancelled and rec.s == 'cancelled') then
    if rec.s == 'failed' then from_failed = from_failed + 1 else from_cancelled = from_cancelled + 1 end
    rec.s = 'pending'
    rec.e = nil
    rec.t1 = nil
    rec.l = 0
    put_rec(q, recs[i], rec)
    redis.call('RPUSH', q .. ':retry', recs[i])
  end
end
if with_cancelled and m.cut == '1' and m.cursor < m.total then
  from_cancelled = from_cancelled + (m.total - m.cursor)
  redis.call('HSET', q, 'cut', '0')
end
again = from_failed + from_cancelled
if again == 0 then return {'nothing', 0} end
local status = 'running'
if m.succeeded + (m.failed - from_failed) + (m.cancelled - from_cancelled) == 0 then status = 'pending' end
incr(q, 'failed', -from_failed)
incr(q, 'cancelled', -from_cancelled)
redis.call('HINCRBY', q, 'pending', again)
redis.call('HINCRBY', q, 'attempt', 1)
redis.call('HDEL', q, 'finished_at', 'cancel_requested_at')
redis.call('HSET', q, 'status', status)
m.status = status
add_pending(m, again)
sched_add(qid, uk, m.model, m.priority)
local u = ukey(uk)
redis.call('ZREM', u .. ':hist', qid)
redis.call('ZADD', u .. ':active', now, qid)
set_ttl(qid, safety)
emit(qid, uk, {type = 'queue', status = status, retried = again}, now)
return {'retried', again}

-- @script delete
-- ARGV: qid, uk
local qid, uk = ARGV[1], ARGV[2]
local q = qkey(qid)
local m = meta(q)
if (not m) or m.uk ~= uk then return 'notfound' end
if (not m.finished_at) or m.running > 0 then return 'conflict' end
for _, s in ipairs(SUFFIXES) do redis.call('DEL', q .. s) end
local u = ukey(uk)
redis.call('ZREM', u .. ':hist', qid)
redis.call('ZREM', u .. ':active', qid)
return 'deleted'

-- @script webhook_lease
-- ARGV: now, limit, lease_ms. Leases queues whose webhook deliveries are due.
local now, limit, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local due = redis.call('ZRANGEBYSCORE', P .. 'wh:due', '-inf', now, 'LIMIT', 0, limit)
for _, qid in ipairs(due) do redis.call('ZADD', P .. 'wh:due', now + lease, qid) end
return due

-- @script webhook_progress
-- ARGV: qid, cursor, state_json, next_due_ms ('' = nothing left to send unless newer events arrived)
local qid, cursor, state, next_due = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local q = qkey(qid)
if redis.call('EXISTS', q) == 0 then
  redis.call('ZREM', P .. 'wh:due', qid)
  return 0
end
redis.call('HSET', q, 'wh_cursor', cursor, 'webhook_state', state)
if next_due ~= '' then
  redis.call('ZADD', P .. 'wh:due', tonumber(next_due), qid)
  return 1
end
local newest = redis.call('XREVRANGE', q .. ':ev', '+', '-', 'COUNT', 1)
if #newest > 0 and newest[1][1] ~= cursor then
  redis.call('ZADD', P .. 'wh:due', 0, qid)
  return 1
end
redis.call('ZREM', P .. 'wh:due', qid)
return 0

-- @script summary
-- ARGV: qid, bucket, buckets. One round trip for a status summary: the meta hash, and for an
-- unfinished queue the schedule facts that position and ETA need.
local qid, bucket, nbuckets = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local q = qkey(qid)
local flat = redis.call('HGETALL', q)
if #flat == 0 then return {} end
local m = meta(q)
local extra = {}
if not m.finished_at then
  local pend = redis.call('HMGET', P .. 'pend:' .. m.model, unpack(PRIOS))
  local r = ring(m.model, m.priority)
  local tp = {}
  for i = 0, nbuckets do tp[#tp + 1] = P .. 'tp:' .. m.model .. ':' .. (bucket - i) end
  local rates = redis.call('MGET', unpack(tp))
  extra = {pend[1] or '0', pend[2] or '0', pend[3] or '0', redis.call('ZRANK', r, m.uk) or -1, redis.call('ZCARD', r),
    redis.call('ZRANK', uring(m.model, m.priority, m.uk), qid) or -1}
  for i = 1, #rates do extra[#extra + 1] = rates[i] or '0' end
end
return {flat, extra}
