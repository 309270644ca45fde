"""The Lua scripts that arbitrate one budget between hosts, and their contracts.

Every script takes the four keys of :func:`mppools._limiter.redis._names.keys` (one hash tag:
safe on Redis Cluster; Redis 5 or later) and reads the time at most once, with
``redis.call('TIME')``: leases and tickets are scored in the coordination server's clock,
never a client's. Times are integer milliseconds of that clock. A script that finds no
generation, or another one than the caller's, answers ``LOST`` and changes nothing: the
caller must :data:`REGISTER` what it holds.

Status codes (first element of every answer but ``init`` and ``stats``):

* ``OK`` (0)
* ``LOST`` (1): the budget's generation is missing (Redis lost its data) or is not the caller's
* ``GRACE`` (2): a new generation's grace period runs; nothing new is granted
* ``REFUSED`` (3): a shrink below the leases held without ``force``
* ``CREATED`` (4): ``register`` started a new generation (and its grace period)
* ``STALE`` (5): ``release`` was decided before a grant this host has since been given, or
  ``resize`` before the limit was last set (it arrived late: sent on a connection that
  timed out, and run after later calls): ignored

Contracts (ARGV in order; answers as arrays):

``init(limit, ttl_ms, new_gen, fresh)`` -> ``{created, gen, limit, grace_until, now}``
    Join the budget, or create it with generation ``new_gen`` (``limit`` 0: only join;
    ``created`` is 2 if there is nothing to join). A created budget grants
    nothing for ``ttl_ms`` (its grace period) unless ``fresh`` is ``1``: a Redis that lost its
    data looks like a new one to a host that never knew it, and the hosts that still hold
    leases need that long to re-register. An existing budget keeps its limit.

``acquire(host, n, ttl_ms, gen, ticket_ttl_ms, partial)``
    -> ``{status, granted, held, expiry, now, limit, grace_until, gen}``
    Drop expired leases and tickets, then grant up to ``n`` leases to ``host``: only while it
    holds the oldest live ticket (it takes one, or keeps its own, on every call with
    ``n > 0``), so hosts are served first come, first served; a ticket lives ``ticket_ttl_ms``
    past the host's last call. A host served in full (or in part, with ``partial`` 1) leaves
    the queue. All leases of
    ``host`` (old and new) expire at ``now + ttl_ms``. ``n = 0`` only renews. A grant is
    stamped in the meta hash as ``t:<host>`` -> ``now`` (the host's last grant, for
    ``release``; dropped with the host's leases when they expire).

``renew(host, ttl_ms, gen[, figures])`` -> ``{status, held, expiry, now, limit, grace_until, gen}``
    Drop expired leases, then move the expiry of all leases ``host`` still holds to
    ``now + ttl_ms``. ``held`` lower than the caller thinks means leases expired. A host that
    holds leases may report its local ``figures`` (``in_use:idle:waiting``): kept in the meta
    hash as ``i:<host>`` -> ``figures:now`` until its leases expire (for ``stats``).

``release(host, target, gen, drop_ticket, view)`` -> ``{status, released, held}``
    Give back leases until ``host`` holds at most ``target`` (idempotent: a call repeated
    after a lost answer gives back nothing more; also returns grants whose answer the host
    never saw); ``drop_ticket`` ``1`` also leaves the queue (an acquire that timed out). The
    expiry of the rest is unchanged. Reads no clock: it only lowers counts. ``view`` is the
    server time (``now``) of the newest answer the host had about its leases when it
    decided: a release decided before the host's last grant (``t:<host>`` later than
    ``view``) is ``STALE`` and changes nothing (no ``view``: no such check). Without that,
    a release sent on a connection that timed out (a frozen server) and run only after the
    host's next acquire would take away the lease that acquire granted, while the host
    uses it (two hosts on one lease).

``resize(limit, force, view)`` -> ``{status, used, limit, now}``
    Set the limit for every host. Below the leases held: ``REFUSED`` without ``force``; with
    it the excess is debt (nothing is granted until hosts give back enough). ``view`` is the
    newest server time the caller had seen when it decided: if the limit was set since
    (``resized_at`` later than ``view``) the call is ``STALE`` and changes nothing, so that
    a resize run late (its caller timed out and maybe resized again) cannot undo a later
    one; a caller still waiting may try again with the answer's ``now``.

``register(host, held, old_gen, limit, ttl_ms, new_gen)``
    -> ``{status, accepted, held, expiry, now, limit, grace_until, gen}``
    A host whose generation was lost declares the ``held`` leases it still holds (its fence
    deadline has not passed). No budget: one is created with generation ``new_gen``
    (``prev = old_gen``), ``limit`` and a grace period of ``ttl_ms`` (``CREATED``). During the
    grace period everything declared is accepted (those connections are open); after it, at
    most what is free, and the caller must close the rest. Registering twice counts once.

``stats()`` -> ``{gen, prev, limit, used, grace_until, now, created, hosts, tickets, seq}``
    Read only. ``hosts`` is a flat ``{host, held, expiry, figures, ...}`` of live leases
    (``figures`` as the host last reported them with their server time, or ``''``), ``tickets`` a
    flat ``{host, number, expiry, ...}`` of live tickets oldest first; ``used`` counts live
    leases only. No budget: ``gen`` is ``false``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

__all__ = [
    "ACQUIRE",
    "CREATED",
    "GRACE",
    "INIT",
    "LOST",
    "OK",
    "REFUSED",
    "REGISTER",
    "RELEASE",
    "RENEW",
    "RESIZE",
    "SCRIPTS",
    "STALE",
    "STATS",
    "Script",
]

OK, LOST, GRACE, REFUSED, CREATED, STALE = 0, 1, 2, 3, 4, 5


@dataclass(frozen=True, slots=True)
class Script:
    """One Lua script: its name (for error messages), source and SHA1 (for EVALSHA)."""

    name: str
    source: str
    sha: str


# KEYS[1] meta (hash; also 'h:<host>' -> leases held), KEYS[2] expiry, KEYS[3] tickets,
# KEYS[4] wait. The fast paths (acquire with nobody waiting, release) touch few keys: the
# per-host counts live in the meta hash so that one HMGET reads and one HSET writes them.
_PRELUDE = r"""
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- drop the leases of hosts that did not renew in time; returns how many were dropped
local function expire(now)
  if redis.call('ZCOUNT', KEYS[2], '-inf', now) == 0 then return 0 end
  local fields, figures = {}, {}
  for _, h in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
    fields[#fields + 1] = 'h:' .. h
    figures[#figures + 1] = 'i:' .. h
    figures[#figures + 1] = 't:' .. h
  end
  local freed = 0
  for _, c in ipairs(redis.call('HMGET', KEYS[1], unpack(fields))) do
    freed = freed + tonumber(c or '0')
  end
  redis.call('HDEL', KEYS[1], unpack(fields))
  redis.call('HDEL', KEYS[1], unpack(figures))
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if freed > 0 then redis.call('HINCRBY', KEYS[1], 'used', -freed) end
  return freed
end
-- drop the tickets of hosts that stopped asking
local function expire_tickets(now)
  local gone = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now)
  if #gone > 0 then
    redis.call('ZREM', KEYS[3], unpack(gone))
    redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  end
end
local function held_by(host)
  return tonumber(redis.call('HGET', KEYS[1], 'h:' .. host) or '0')
end
local function wipe()
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
end
"""

_INIT = r"""
local now = now_ms()
local m = redis.call('HMGET', KEYS[1], 'gen', 'limit', 'grace_until')
if m[1] then
  return {0, m[1], tonumber(m[2]), tonumber(m[3] or '0'), now}
end
if tonumber(ARGV[1]) == 0 then return {2, '', 0, 0, now} end
wipe()
local grace = 0
if ARGV[4] ~= '1' then grace = now + tonumber(ARGV[2]) end
redis.call('HSET', KEYS[1], 'gen', ARGV[3], 'prev', '', 'limit', ARGV[1], 'used', 0,
           'seq', 0, 'grace_until', grace, 'created', now)
return {1, ARGV[3], tonumber(ARGV[1]), grace, now}
"""

_ACQUIRE = r"""
local now = now_ms()
local host, n, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local hf = 'h:' .. host
local m = redis.call('HMGET', KEYS[1], 'gen', 'limit', 'grace_until', 'used', hf)
if (not m[1]) or m[1] ~= ARGV[4] then
  return {1, 0, 0, 0, now, 0, 0, m[1] or ''}
end
local limit, grace, used = tonumber(m[2]), tonumber(m[3]), tonumber(m[4])
local held = tonumber(m[5] or '0')
local freed = expire(now)
if freed > 0 then
  used = used - freed
  held = held_by(host)
end
local status, granted = 0, 0
if grace > now then status = 2 end
if n > 0 then
  -- first come, first served: only the host at the head of the queue (or anyone, when
  -- nobody waits) may take a free lease
  local head = nil
  if redis.call('ZCARD', KEYS[3]) > 0 then
    head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
    if head ~= host then
      expire_tickets(now)
      head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
    end
  end
  if status == 0 and ((not head) or head == host) and used < limit then
    granted = math.min(n, limit - used)
  end
  if granted == n or (granted > 0 and ARGV[6] == '1') then
    if head == host then
      redis.call('ZREM', KEYS[3], host)
      redis.call('ZREM', KEYS[4], host)
    end
  else
    if head ~= host and not redis.call('ZSCORE', KEYS[3], host) then
      redis.call('ZADD', KEYS[3], redis.call('HINCRBY', KEYS[1], 'seq', 1), host)
    end
    redis.call('ZADD', KEYS[4], now + tonumber(ARGV[5]), host)
  end
end
if granted > 0 then
  held = held + granted
  redis.call('HSET', KEYS[1], 'used', used + granted, hf, held, 't:' .. host, now)
end
local expiry = 0
if held > 0 then
  expiry = now + ttl
  redis.call('ZADD', KEYS[2], expiry, host)
end
return {status, granted, held, expiry, now, limit, grace, m[1]}
"""

_RENEW = r"""
local now = now_ms()
local host, ttl = ARGV[1], tonumber(ARGV[2])
local m = redis.call('HMGET', KEYS[1], 'gen', 'limit', 'grace_until', 'h:' .. host)
if (not m[1]) or m[1] ~= ARGV[3] then
  return {1, 0, 0, now, 0, 0, m[1] or ''}
end
local held, expiry = tonumber(m[4] or '0'), 0
if expire(now) > 0 then held = held_by(host) end
if held > 0 then
  expiry = now + ttl
  redis.call('ZADD', KEYS[2], expiry, host)
  if ARGV[4] and ARGV[4] ~= '' then
    redis.call('HSET', KEYS[1], 'i:' .. host, ARGV[4] .. ':' .. now)
  end
end
return {0, held, expiry, now, tonumber(m[2]), tonumber(m[3]), m[1]}
"""

_RELEASE = r"""
local host, target = ARGV[1], tonumber(ARGV[2])
local hf = 'h:' .. host
local m = redis.call('HMGET', KEYS[1], 'gen', 'used', hf, 't:' .. host)
if (not m[1]) or m[1] ~= ARGV[3] then
  return {1, 0, 0}
end
if ARGV[5] and tonumber(m[4] or '0') > tonumber(ARGV[5]) then
  -- decided before a grant the host has had since: late, it would take that grant away
  return {5, 0, tonumber(m[3] or '0')}
end
if ARGV[4] == '1' then
  redis.call('ZREM', KEYS[3], host)
  redis.call('ZREM', KEYS[4], host)
end
-- no expiry pass: the leases of this host still counted are given back now instead
local held = tonumber(m[3] or '0')
local k = 0
if held > target then
  k = held - target
  redis.call('HSET', KEYS[1], 'used', tonumber(m[2]) - k, hf, target)
  held = target
end
return {0, k, held}
"""

_RESIZE = r"""
local now = now_ms()
local m = redis.call('HMGET', KEYS[1], 'gen', 'limit')
if not m[1] then return {1, 0, 0, now} end
expire(now)
local used = tonumber(redis.call('HGET', KEYS[1], 'used'))
local limit = tonumber(ARGV[1])
if limit < used and ARGV[2] ~= '1' then
  return {3, used, tonumber(m[2]), now}
end
local at = tonumber(redis.call('HGET', KEYS[1], 'resized_at') or '0')
if ARGV[3] and at > tonumber(ARGV[3]) then
  return {5, used, tonumber(m[2]), now}
end
redis.call('HSET', KEYS[1], 'limit', limit, 'resized_at', now)
return {0, used, limit, now}
"""

_REGISTER = r"""
local now = now_ms()
local host, want, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[5])
local m = redis.call('HMGET', KEYS[1], 'gen', 'limit', 'grace_until', 'created')
local status, gen, limit, grace = 0, m[1], tonumber(m[2] or '0'), tonumber(m[3] or '0')
if not gen then
  wipe()
  status, gen, limit, grace = 4, ARGV[6], tonumber(ARGV[4]), now + ttl
  redis.call('HSET', KEYS[1], 'gen', gen, 'prev', ARGV[3], 'limit', limit, 'used', 0,
             'seq', 0, 'grace_until', grace, 'created', now)
else
  expire(now)
  if gen ~= ARGV[3] and grace > now and tonumber(m[4]) + ttl > grace then
    -- a host with a longer TTL than the first registrant: its old leases live that long
    grace = tonumber(m[4]) + ttl
    redis.call('HSET', KEYS[1], 'grace_until', grace)
  end
end
local held = held_by(host)
local accepted = 0
if gen ~= ARGV[3] and want > held then
  accepted = want - held
  if grace <= now then
    local free = limit - tonumber(redis.call('HGET', KEYS[1], 'used'))
    accepted = math.max(0, math.min(accepted, free))
  end
  if accepted > 0 then
    held = held + accepted
    redis.call('HSET', KEYS[1], 'h:' .. host, held, 't:' .. host, now)
    redis.call('HINCRBY', KEYS[1], 'used', accepted)
  end
end
local expiry = 0
if held > 0 then
  expiry = now + ttl
  redis.call('ZADD', KEYS[2], expiry, host)
end
return {status, accepted, held, expiry, now, limit, grace, gen}
"""

_STATS = r"""
local now = now_ms()
local m = redis.call('HMGET', KEYS[1], 'gen', 'prev', 'limit', 'grace_until', 'created', 'seq')
if not m[1] then return {false, '', 0, 0, 0, now, 0, {}, {}, 0} end
local hosts, used = {}, 0
local live = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. now, '+inf', 'WITHSCORES')
for i = 1, #live, 2 do
  local h = held_by(live[i])
  if h > 0 then
    used = used + h
    hosts[#hosts + 1] = live[i]
    hosts[#hosts + 1] = h
    hosts[#hosts + 1] = tonumber(live[i + 1])
    hosts[#hosts + 1] = redis.call('HGET', KEYS[1], 'i:' .. live[i]) or ''
  end
end
local tickets = {}
local queue = redis.call('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES')
for i = 1, #queue, 2 do
  local exp = tonumber(redis.call('ZSCORE', KEYS[4], queue[i]) or '0')
  if exp > now then
    tickets[#tickets + 1] = queue[i]
    tickets[#tickets + 1] = tonumber(queue[i + 1])
    tickets[#tickets + 1] = exp
  end
end
return {m[1], m[2] or '', tonumber(m[3]), used, tonumber(m[4]), now, tonumber(m[5]),
        hosts, tickets, tonumber(m[6] or '0')}
"""


def _script(name: str, body: str) -> Script:
    source = _PRELUDE + body
    return Script(name, source, hashlib.sha1(source.encode()).hexdigest())


INIT = _script("init", _INIT)
ACQUIRE = _script("acquire", _ACQUIRE)
RENEW = _script("renew", _RENEW)
RELEASE = _script("release", _RELEASE)
RESIZE = _script("resize", _RESIZE)
REGISTER = _script("register", _REGISTER)
STATS = _script("stats", _STATS)

#: every script, for loading them all at once
SCRIPTS = (INIT, ACQUIRE, RENEW, RELEASE, RESIZE, REGISTER, STATS)
