#!/usr/bin/env bash
# Installs PostgreSQL (Debian's package) if it is missing, starts it on loopback, makes a
# fresh test database, and prints its URL. .ci/run uses it; to run the PostgreSQL tests
# yourself (as root, on Debian or Ubuntu):
#
#   export TOWER_BACKGROUND_POSTGRES=$(.ci/postgres.sh)
#   cargo test -p tower-background-integration --test durable postgres::
set -euo pipefail
if ! command -v pg_lsclusters >/dev/null 2>&1; then
  echo "postgres.sh: installing Debian's package 'postgresql'" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
fi
read -r version cluster port _ < <(pg_lsclusters --no-header | head -1)
pg_ctlcluster "$version" "$cluster" start >&2 2>/dev/null || true
for _ in $(seq 1 100); do
  su postgres -c "pg_isready -q -p $port" && break
  sleep 0.1
done
su postgres -c "psql -q -p $port" >&2 <<'SQL'
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tower_background') THEN
    CREATE ROLE tower_background LOGIN SUPERUSER PASSWORD 'tower_background';
  END IF;
END $$;
SQL
su postgres -c "dropdb -p $port --if-exists tower_background_test && createdb -p $port -O tower_background tower_background_test" >&2
echo "postgres://tower_background:tower_background@127.0.0.1:$port/tower_background_test"
