-- The conditional append of RedisStore::append; see the doc comment of APPEND.
local head = redis.call('GET', KEYS[1])
if (head or '0-0') ~= ARGV[1] then return false end
for i = 6, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    return redis.error_reply('ERR blob chunk ' .. KEYS[i] .. ' expired before its append')
  end
end
local id = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
redis.call('SET', KEYS[1], id)
-- The first record of a log names it: a dataset dropped and created again gets another name.
if not head then redis.call('SET', KEYS[5], id) end
if redis.call('SADD', KEYS[3], ARGV[2]) == 1 then
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', '1000', '*', 'd', ARGV[2])
end
for i = 6, #KEYS do redis.call('PERSIST', KEYS[i]) end
return id
