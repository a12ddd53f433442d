#!/usr/bin/env bash
# A throw-away PostgreSQL server for the tests and benchmarks (SPEC §11): Debian's `postgresql` package, a cluster
# made with initdb in a directory of its own, listening on 127.0.0.1 only, trusting local connections.
#
#   scripts/postgres.sh start DIR   installs the package when missing (as root), creates and starts the cluster in
#                                   DIR (which must not exist or be empty), and prints its URL on stdout
#   scripts/postgres.sh stop DIR    stops it at once, as a crash would (the directory stays; remove it after)
#   scripts/postgres.sh resume DIR  starts a stopped cluster again, on the same port (the outage tests)
#
# With POSTGRES_NO_FSYNC=1 (the tests) the server does not wait for its disk: faster, and lost on power loss, which
# a throw-away cluster does not mind. Benchmarks leave it unset, so their figures include PostgreSQL's durable commits.
#
# PostgreSQL refuses to run as root: as root, the cluster belongs to the package's `postgres` user.
set -euo pipefail

bin_dir() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -z "$dir" ] || [ ! -x "$dir/initdb" ]; then
    if [ "$(id -u)" = 0 ]; then
      apt-get update >&2
      DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql >&2
      dir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    else
      echo "postgres.sh: Debian's postgresql is not installed: run 'sudo apt-get install postgresql', then again." >&2
      exit 1
    fi
  fi
  echo "$dir"
}

as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

cmd=${1:-}
dir=${2:-}
if [ -z "$cmd" ] || [ -z "$dir" ]; then
  echo "usage: $0 start|stop|resume DIR" >&2
  exit 2
fi

case "$cmd" in
start)
  bin=$(bin_dir)
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  if [ "$(id -u)" = 0 ]; then chown postgres: "$dir"; fi
  user=$(if [ "$(id -u)" = 0 ]; then echo postgres; else id -un; fi)
  as_owner "$bin/initdb" -D "$dir/data" -U "$user" --auth=trust --encoding=UTF8 --no-sync >"$dir/initdb.log" 2>&1 ||
    { cat "$dir/initdb.log" >&2; exit 1; }
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  options="-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$dir -c max_connections=400"
  if [ "${POSTGRES_NO_FSYNC:-0}" = 1 ]; then
    options="$options -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
  fi
  echo "$options" >"$dir/options"
  as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start -o "$options" >/dev/null ||
    { cat "$dir/server.log" >&2; exit 1; }
  echo "postgres://$user@127.0.0.1:$port/postgres"
  ;;
resume)
  bin=$(bin_dir)
  as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start -o "$(cat "$dir/options")" >/dev/null ||
    { cat "$dir/server.log" >&2; exit 1; }
  ;;
stop)
  bin=$(bin_dir)
  if [ -d "$dir/data" ]; then as_owner "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true; fi
  ;;
*)
  echo "usage: $0 start|stop|resume DIR" >&2
  exit 2
  ;;
esac
