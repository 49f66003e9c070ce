-- The snapshot switch of RedisStore::put_snapshot; see the doc comment of SWITCH.
local function cmp_num(a, b)
  if #a ~= #b then return #a < #b and -1 or 1 end
  if a == b then return 0 end
  return a < b and -1 or 1
end
local function cmp_pos(x, y)
  local xa, xb = string.match(x, '^(%d+)-(%d+)$')
  local ya, yb = string.match(y, '^(%d+)-(%d+)$')
  if not xa or not ya then error('not a stream id: ' .. x .. ' or ' .. y) end
  local c = cmp_num(xa, ya)
  if c ~= 0 then return c end
  return cmp_num(xb, yb)
end
local current = redis.call('GET', KEYS[1])
if current and cmp_num(current, ARGV[1]) >= 0 then return {0, current} end
local covered = redis.call('GET', KEYS[2])
if covered and cmp_pos(covered, ARGV[2]) > 0 then return {0, covered} end
local head = redis.call('GET', KEYS[3]) or '0-0'
if cmp_pos(ARGV[2], head) > 0 then return {-1, head} end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
redis.call('XTRIM', KEYS[4], 'MINID', ARGV[3])
return {1, current or ''}
