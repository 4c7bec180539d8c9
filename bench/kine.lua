-- A kine-shaped load for sysbench (bench/db): kine (k3s's etcd shim) keeps every Kubernetes
-- object in one MySQL table, `kine`, as a log of revisions. Each update reads the key's latest
-- row, then INSERTs a new row (its own transaction: one commit) pointing at the previous
-- revision; a compactor now and then DELETEs the rows that newer revisions superseded. The
-- schema is kine's MySQL one (pkg/drivers/mysql); the statements are shaped like its queries.
--
--   sysbench bench/kine.lua --db-driver=mysql ... prepare   the table and one row per key
--   sysbench bench/kine.lua --db-driver=mysql ... run       updates (and compactions)
--
-- One event is one update (a SELECT, then one INSERT commit) or, on thread 0 every
-- --compact-every events, one compaction (one transaction). Two clients updating the same key at
-- once collide on the unique (name, prev_revision) index as in kine; run with
-- --mysql-ignore-errors=1062,1213 so sysbench retries that event.

sysbench.cmdline.options = {
  keys = {"Distinct object names (Kubernetes objects)", 1000},
  value_size = {"Bytes of each object's value", 1024},
  compact_every = {"Thread 0 compacts once every this many of its events", 100},
  compact_batch = {"Revisions one compaction covers at most", 500},
  compact_keep = {"Newest revisions compaction never touches", 1000},
}

-- kine's MySQL schema (pkg/drivers/mysql), kept in kine.sql next to this script (the k3s test
-- creates the table from the same file): its statements, split at ";".
local function schema()
  local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
  local f = assert(io.open(dir .. "kine.sql"))
  local text = f:read("*a")
  f:close()
  local stmts = {}
  for stmt in text:gmatch("[^;]+") do
    if stmt:match("%S") then
      stmts[#stmts + 1] = stmt
    end
  end
  return stmts
end

local function key_name(i)
  return string.format("/registry/configmaps/bench/obj-%06d", i)
end

local function random_value()
  return sysbench.rand.string(string.rep("@", sysbench.opt.value_size))
end

-- The table, kine's compact_rev_key row (its prev_revision is the compacted revision) and one
-- created row per key, in batches of 100 rows per INSERT.
function cmd_prepare()
  local con = sysbench.sql.driver():connect()
  for _, stmt in ipairs(schema()) do
    con:query(stmt)
  end
  con:query("INSERT INTO kine (name, created, deleted, create_revision, prev_revision, lease, "
    .. "value, old_value) VALUES ('compact_rev_key', 0, 0, 0, 0, 0, '', '')")
  local rows = {}
  for i = 1, sysbench.opt.keys do
    rows[#rows + 1] = string.format("('%s', 1, 0, 0, 0, 0, '%s', '')", key_name(i), random_value())
    if #rows == 100 or i == sysbench.opt.keys then
      con:query("INSERT INTO kine (name, created, deleted, create_revision, prev_revision, lease, "
        .. "value, old_value) VALUES " .. table.concat(rows, ","))
      rows = {}
    end
  end
  con:disconnect()
end

sysbench.cmdline.commands = {
  prepare = {cmd_prepare},
}

function thread_init()
  con = sysbench.sql.driver():connect()
  events = 0
end

function thread_done()
  con:disconnect()
end

-- kine's Update: the key's latest revision, then the new revision as one INSERT (autocommit).
local function update()
  local name = key_name(sysbench.rand.uniform(1, sysbench.opt.keys))
  local rs = con:query(string.format("SELECT id, create_revision, value FROM kine "
    .. "WHERE name = '%s' ORDER BY id DESC LIMIT 1", name))
  local row = rs:fetch_row()
  local prev, created, old = row[1], row[2], row[3]
  if created == "0" then
    created = prev
  end
  con:query(string.format("INSERT INTO kine (name, created, deleted, create_revision, "
    .. "prev_revision, lease, value, old_value) VALUES ('%s', 0, 0, %s, %s, 0, '%s', '%s')",
    name, created, prev, random_value(), old))
end

-- kine's compactor: the rows superseded by revisions in (compacted, compacted + batch], keeping
-- the newest compact_keep revisions, then the new compacted revision, in one transaction. The
-- superseded ids are read first and deleted by primary key: a DELETE ... WHERE id IN (SELECT ...
-- FROM kine) scans and locks the whole table on MariaDB 10.11, stalling every insert.
local function compact()
  con:query("BEGIN")
  local lo = tonumber(con:query("SELECT prev_revision FROM kine WHERE name = 'compact_rev_key' "
    .. "FOR UPDATE"):fetch_row()[1])
  local top = tonumber(con:query("SELECT MAX(id) FROM kine"):fetch_row()[1])
  local hi = math.min(lo + sysbench.opt.compact_batch, top - sysbench.opt.compact_keep)
  if hi > lo then
    local rs = con:query(string.format("SELECT prev_revision FROM kine WHERE id > %d AND id <= %d "
      .. "AND prev_revision != 0 AND name != 'compact_rev_key'", lo, hi))
    local ids = {}
    for _ = 1, rs.nrows do
      ids[#ids + 1] = rs:fetch_row()[1]
    end
    if #ids > 0 then
      con:query("DELETE FROM kine WHERE id IN (" .. table.concat(ids, ",") .. ")")
    end
    con:query(string.format("UPDATE kine SET prev_revision = %d WHERE name = 'compact_rev_key'", hi))
  end
  con:query("COMMIT")
end

function event()
  events = events + 1
  if sysbench.tid == 0 and events % sysbench.opt.compact_every == 0 then
    compact()
  else
    update()
  end
end
