-- The fair schedule: claiming the next images, highest priority first, round-robin between users
-- and then between each user's queues, within the models' concurrency caps and back-offs.

-- @script claim
-- ARGV: worker, lease_ms, n, caps_json {model: cap}, models_json [..], safety_ttl
local worker, lease_ms, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local caps = cjson.decode(ARGV[4])
local models = cjson.decode(ARGV[5])
local safety = tonumber(ARGV[6])
local now = server_now()
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
for _, prio in ipairs(PRIORITIES) do
  for _, model in ipairs(models) do
    local r = ring(model, prio)
    while claimed < n and not blocked[model] do
      local cap = tonumber(caps[model] or 0)
      if cap > 0 and tonumber(redis.call('HGET', INFLIGHT_KEY, model) or '0') >= cap then
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
        if m and m.status ~= QueueState.CANCELLED and not m.finished_at then
          idx = redis.call('LPOP', q .. ':retry')
          if (not idx) and m.cut ~= '1' and m.cursor < m.total then
            idx = tostring(m.cursor)
            m.cursor = m.cursor + 1
            redis.call('HSET', q, 'cursor', m.cursor)
          end
        end
        if not m then settle_gone(qid) end  -- expired before it finished
        if not idx then
          sched_remove(qid, uk, model, prio)
        else
          local more = redis.call('LLEN', q .. ':retry') > 0 or (m.cut ~= '1' and m.cursor < m.total)
          local seq = redis.call('INCR', SEQ_KEY)
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
          rec.s = ImageStatus.RUNNING
          rec.a = (rec.a or 0) + 1
          rec.w = worker
          rec.t0 = now
          rec.t1 = nil
          rec.e = nil
          put_rec(q, idx, rec)
          redis.call('HINCRBY', q, 'pending', -1)
          redis.call('HINCRBY', q, 'running', 1)
          add_pending(qid, m, -1)
          add_running(qid, 1)
          redis.call('HINCRBY', INFLIGHT_KEY, model, 1)
          keep_alive(qid, uk, safety)
          redis.call('ZADD', LEASES_KEY, now + lease_ms, qid .. '|' .. idx)
          if m.status == QueueState.PENDING then
            redis.call('HSET', q, 'status', QueueState.RUNNING, 'started_at', now)
            emit(qid, m.uk, {type = 'queue', status = QueueState.RUNNING}, now)
          end
          emit(qid, m.uk, {type = 'image', index = tonumber(idx), status = ImageStatus.RUNNING, attempt = rec.a}, now)
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
