-- health.lua: the health probe. A real script call, so SERVING means scripts run.
--
-- No KEYS, no ARGV. Returns Redis's clock in milliseconds.

return now_ms()
