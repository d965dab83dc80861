#!/usr/bin/env bash
# The real services that the distributed-mode tests need, on loopback only:
#   - PostgreSQL (Debian's package, cluster "main"), with role and database `claw` (password
#     `claw`, CREATEDB so tests can make their own databases):
#       postgres://claw:claw@127.0.0.1:5432/claw
#   - Apache Kafka 4.1.1, one KRaft node that is both broker and controller:
#       PLAINTEXT 127.0.0.1:9092, controller 127.0.0.1:9093
#
# Usage (from any directory; as root, or with sudo for the apt/Postgres steps):
#   scripts/services.sh up       install what is missing, start both, wait until they answer
#                                (idempotent: does nothing when both are already up)
#   scripts/services.sh down     stop both
#   scripts/services.sh status   say whether each is up (exit 0 only when both are)
#   scripts/services.sh env      print one eval-able line:
#                                  export CLAW_KAFKA_BROKERS=... CLAW_DATABASE_URL=...
#   scripts/services.sh clean-tests
#                                drop the databases (claw_test_*) and topics (claw.test.*)
#                                that earlier test runs left
#   scripts/services.sh topics ARGS...
#                                Kafka's topic CLI against the broker, e.g. `topics --list`
#
#   eval "$(scripts/services.sh env)"
#
# Kafka's jars come from Maven Central through scripts/kafka/pom.xml
# (`mvn dependency:copy-dependencies`) and are cached with the broker's data and log in
# $CLAW_SERVICES_DIR (default: <repo>/target/services, git-ignored with target/).
#
# Settings (environment):
#   CLAW_SERVICES_DIR               cache/data dir            (default <repo>/target/services)
#   CLAW_PG_PORT                    PostgreSQL port           (default 5432)
#   CLAW_KAFKA_PORT                 Kafka PLAINTEXT port      (default 9092)
#   CLAW_KAFKA_CONTROLLER_PORT      Kafka controller port     (default 9093)
#   CLAW_KAFKA_LOG_LEVEL            broker log level          (default WARN; INFO for debugging)
#   CLAW_SERVICES_TIMEOUT           seconds `up` waits        (default 120)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SERVICES_DIR="${CLAW_SERVICES_DIR:-$REPO/target/services}"
PG_PORT="${CLAW_PG_PORT:-5432}"
KAFKA_PORT="${CLAW_KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${CLAW_KAFKA_CONTROLLER_PORT:-9093}"
KAFKA_LOG_LEVEL="${CLAW_KAFKA_LOG_LEVEL:-WARN}"
TIMEOUT="${CLAW_SERVICES_TIMEOUT:-120}"

PG_USER=claw
PG_PASSWORD=claw
PG_DB=claw
PG_MAX_CONNECTIONS=200
DATABASE_URL="postgres://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DB"
KAFKA_BROKERS="127.0.0.1:$KAFKA_PORT"

KAFKA_POM="$REPO/scripts/kafka/pom.xml"
KAFKA_DIR="$SERVICES_DIR/kafka"
KAFKA_LIBS="$KAFKA_DIR/libs"
KAFKA_DATA="$KAFKA_DIR/data"
KAFKA_PROPS="$KAFKA_DIR/server.properties"
KAFKA_LOG4J="$KAFKA_DIR/log4j2.xml"
KAFKA_TOOLS_LOG4J="$KAFKA_DIR/log4j2-tools.xml"
KAFKA_LOG="$KAFKA_DIR/kafka.log"
KAFKA_PIDFILE="$KAFKA_DIR/kafka.pid"
# A fixed cluster id (base64 of 16 bytes): the node is formatted once and its data reused.
KAFKA_CLUSTER_ID="bmNsYXctbG9jYWwta2Fma2E"

export DEBIAN_FRONTEND=noninteractive

log() { printf 'services: %s\n' "$*" >&2; }
die() { printf 'services: error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------
# helpers

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi
}

as_postgres() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else sudo -n -u postgres "$@"; fi
}

APT_UPDATED=0
apt_install() {
  if [ "$APT_UPDATED" = 0 ]; then
    log "apt-get update"
    as_root apt-get update -qq >&2
    APT_UPDATED=1
  fi
  log "apt-get install $*"
  as_root apt-get install -y -qq --no-install-recommends "$@" >&2
}

# tcp_open PORT: something accepts connections on 127.0.0.1:PORT
tcp_open() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

deadline_passed() { [ "$SECONDS" -ge "$DEADLINE" ]; }

# ---------------------------------------------------------------------------------------------
# PostgreSQL

pg_version() {
  local v best=""
  for d in /usr/lib/postgresql/*/bin/postgres; do
    [ -x "$d" ] || continue
    v="${d#/usr/lib/postgresql/}"; v="${v%%/*}"
    if [ -z "$best" ] || [ "$v" -gt "$best" ] 2>/dev/null; then best="$v"; fi
  done
  printf '%s' "$best"
}

pg_installed() {
  command -v pg_ctlcluster >/dev/null && command -v psql >/dev/null && [ -n "$(pg_version)" ]
}

pg_answers() {
  pg_isready -q -h 127.0.0.1 -p "$PG_PORT" 2>/dev/null &&
    PGCONNECT_TIMEOUT=5 psql "$DATABASE_URL" -XtAqc 'select 1' >/dev/null 2>&1
}

pg_cluster_running() {  # VERSION
  pg_lsclusters -h 2>/dev/null | awk -v v="$1" '$1 == v && $2 == "main" && $4 == "online" { f = 1 } END { exit !f }'
}

pg_up() {
  if pg_answers; then
    log "postgres: already up on 127.0.0.1:$PG_PORT"
    return 0
  fi
  pg_installed || apt_install postgresql postgresql-client
  local ver
  ver="$(pg_version)"
  [ -n "$ver" ] || die "postgres: no server found under /usr/lib/postgresql after install"

  if ! pg_lsclusters -h 2>/dev/null | awk -v v="$ver" '$1 == v && $2 == "main" { f = 1 } END { exit !f }'; then
    log "postgres: creating cluster $ver/main"
    as_root pg_createcluster "$ver" main >&2
  fi

  # Port and connection limit live in the cluster's postgresql.conf; restart if they changed.
  local changed=0 cur
  cur="$(as_root pg_conftool -s "$ver" main get port 2>/dev/null || true)"
  if [ "$cur" != "$PG_PORT" ]; then as_root pg_conftool "$ver" main set port "$PG_PORT"; changed=1; fi
  cur="$(as_root pg_conftool -s "$ver" main get max_connections 2>/dev/null || true)"
  if [ "$cur" != "$PG_MAX_CONNECTIONS" ]; then
    as_root pg_conftool "$ver" main set max_connections "$PG_MAX_CONNECTIONS"; changed=1
  fi

  if pg_cluster_running "$ver"; then
    if [ "$changed" = 1 ]; then
      log "postgres: restarting $ver/main (configuration changed)"
      as_root pg_ctlcluster "$ver" main restart >&2
    fi
  else
    log "postgres: starting $ver/main on 127.0.0.1:$PG_PORT"
    as_root pg_ctlcluster "$ver" main start >&2
  fi

  until pg_isready -q -h 127.0.0.1 -p "$PG_PORT" 2>/dev/null; do
    deadline_passed && die "postgres: not accepting connections on 127.0.0.1:$PG_PORT after ${TIMEOUT}s (see /var/log/postgresql/postgresql-$ver-main.log)"
    sleep 0.2
  done

  # Role and database, idempotently, over the local socket as the postgres superuser.
  as_postgres psql -X -q -p "$PG_PORT" -d postgres -v ON_ERROR_STOP=1 >/dev/null <<SQL
DO \$\$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_USER') THEN
    CREATE ROLE $PG_USER LOGIN CREATEDB PASSWORD '$PG_PASSWORD';
  ELSE
    ALTER ROLE $PG_USER LOGIN CREATEDB PASSWORD '$PG_PASSWORD';
  END IF;
END
\$\$;
SQL
  if [ "$(as_postgres psql -X -p "$PG_PORT" -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'")" != 1 ]; then
    as_postgres createdb -p "$PG_PORT" -O "$PG_USER" "$PG_DB"
  fi

  until pg_answers; do
    deadline_passed && die "postgres: $DATABASE_URL does not answer (check pg_hba.conf allows scram-sha-256 on host 127.0.0.1/32)"
    sleep 0.2
  done
  log "postgres: up ($DATABASE_URL)"
}

pg_down() {
  pg_installed || { log "postgres: not installed"; return 0; }
  local ver
  ver="$(pg_version)"
  if pg_cluster_running "$ver"; then
    log "postgres: stopping $ver/main"
    as_root pg_ctlcluster "$ver" main stop >&2
  else
    log "postgres: not running"
  fi
}

# ---------------------------------------------------------------------------------------------
# Kafka

kafka_pid() {  # prints the broker's pid when it is alive
  local pid
  [ -f "$KAFKA_PIDFILE" ] || return 1
  pid="$(cat "$KAFKA_PIDFILE" 2>/dev/null)"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'kafka\.Kafka' || return 1
  printf '%s' "$pid"
}

java_tool() {  # CLASS ARGS... : a Kafka CLI class, quiet and quick to start
  java -XX:TieredStopAtLevel=1 -XX:+UseSerialGC -Xmx256m \
    -Dlog4j2.configurationFile="$KAFKA_TOOLS_LOG4J" -cp "$KAFKA_LIBS/*" "$@"
}

kafka_install() {
  command -v java >/dev/null || apt_install openjdk-17-jre-headless
  command -v mvn >/dev/null || apt_install maven
  [ -f "$KAFKA_POM" ] || die "missing $KAFKA_POM"
  local want have=""
  want="$(sha256sum "$KAFKA_POM" | cut -d' ' -f1)"
  [ -f "$KAFKA_LIBS/.complete" ] && have="$(cat "$KAFKA_LIBS/.complete")"
  if [ "$want" != "$have" ]; then
    log "kafka: resolving broker jars with Maven (scripts/kafka/pom.xml) into $KAFKA_LIBS"
    rm -rf "$KAFKA_LIBS"
    mkdir -p "$KAFKA_LIBS"
    if ! mvn -B -Dstyle.color=never -f "$KAFKA_POM" dependency:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory="$KAFKA_LIBS" >"$KAFKA_DIR/mvn.log" 2>&1 </dev/null; then
      tail -n 40 "$KAFKA_DIR/mvn.log" >&2
      die "kafka: mvn dependency:copy-dependencies failed (full output: $KAFKA_DIR/mvn.log)"
    fi
    ls "$KAFKA_LIBS"/kafka_2.13-*.jar >/dev/null 2>&1 || die "kafka: no kafka_2.13 jar in $KAFKA_LIBS"
    printf '%s\n' "$want" >"$KAFKA_LIBS/.complete"
  fi
}

kafka_write_config() {
  mkdir -p "$KAFKA_DATA"
  cat >"$KAFKA_PROPS" <<EOF
# Written by scripts/services.sh on every start; edit the script, not this file.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
log.dirs=$KAFKA_DATA
num.partitions=6
auto.create.topics.enable=true
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
EOF
  # Kafka 4.x logs through log4j2; the broker's output goes to kafka.log (see kafka_up).
  cat >"$KAFKA_LOG4J" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders>
    <Console name="out" target="SYSTEM_OUT">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Root level="$KAFKA_LOG_LEVEL"><AppenderRef ref="out"/></Root>
    <!-- Always say when the node has started and stopped. -->
    <Logger name="kafka.server.KafkaRaftServer" level="INFO"/>
    <Logger name="kafka.server.BrokerServer" level="INFO"/>
    <Logger name="kafka.server.ControllerServer" level="INFO"/>
  </Loggers>
</Configuration>
EOF
  printf 'default.api.timeout.ms=30000\nrequest.timeout.ms=10000\n' >"$KAFKA_DIR/tools.properties"
  cat >"$KAFKA_TOOLS_LOG4J" <<'EOF'
<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders>
    <Console name="err" target="SYSTEM_ERR">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Root level="ERROR"><AppenderRef ref="err"/></Root>
  </Loggers>
</Configuration>
EOF
}

kafka_fail() {
  log "kafka: $*"
  if [ -f "$KAFKA_LOG" ]; then
    log "kafka: last lines of $KAFKA_LOG:"
    tail -n 40 "$KAFKA_LOG" >&2
  fi
  exit 1
}

kafka_answers() {  # a metadata request (list topics) succeeds within 30 s
  java_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$KAFKA_BROKERS" --list \
    --command-config "$KAFKA_DIR/tools.properties" \
    >/dev/null 2>&1 </dev/null
}

kafka_up() {
  local pid
  if pid="$(kafka_pid)" && tcp_open "$KAFKA_PORT"; then
    log "kafka: already up on $KAFKA_BROKERS (pid $pid)"
    return 0
  fi
  mkdir -p "$KAFKA_DIR"
  kafka_install

  if [ -z "${pid:-}" ]; then
    kafka_write_config
    if tcp_open "$KAFKA_PORT" && kafka_answers; then
      # E.g. a broker started from another checkout: use it rather than fight over the port.
      log "kafka: $KAFKA_BROKERS is already served by a broker not started from $SERVICES_DIR; using it"
      return 0
    fi
    for port in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT"; do
      tcp_open "$port" && die "kafka: port 127.0.0.1:$port is taken by another process"
    done
    if [ ! -f "$KAFKA_DATA/meta.properties" ]; then
      log "kafka: formatting $KAFKA_DATA (cluster id $KAFKA_CLUSTER_ID)"
      java_tool kafka.tools.StorageTool format -t "$KAFKA_CLUSTER_ID" -c "$KAFKA_PROPS" >&2 </dev/null ||
        die "kafka: storage format failed"
    fi
    # Keep one previous log around, so a long-lived log does not grow without end.
    if [ -f "$KAFKA_LOG" ] && [ "$(stat -c %s "$KAFKA_LOG")" -gt $((20 * 1024 * 1024)) ]; then
      mv -f "$KAFKA_LOG" "$KAFKA_LOG.1"
    fi
    printf '==== %s: scripts/services.sh starting kafka\n' "$(date -u +%FT%TZ)" >>"$KAFKA_LOG"
    log "kafka: starting broker+controller on $KAFKA_BROKERS (log: $KAFKA_LOG)"
    rm -f "$KAFKA_PIDFILE"
    # setsid: its own session, so the broker outlives this script's process group.
    # shellcheck disable=SC2016  # $$ and $1 belong to the inner shell
    setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "$KAFKA_PIDFILE" \
      nohup java -Xms256m -Xmx512m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
      -Djava.awt.headless=true -Dkafka.logs.dir="$KAFKA_DIR" \
      -Dlog4j2.configurationFile="$KAFKA_LOG4J" \
      -cp "$KAFKA_LIBS/*" kafka.Kafka "$KAFKA_PROPS" \
      >>"$KAFKA_LOG" 2>&1 </dev/null &
    # Wait until the pid file is written and names the JVM.
    until pid="$(kafka_pid)"; do
      if deadline_passed || { [ -f "$KAFKA_PIDFILE" ] && ! kill -0 "$(cat "$KAFKA_PIDFILE")" 2>/dev/null; }; then
        kafka_fail "the broker process exited during start-up"
      fi
      sleep 0.1
    done
  else
    log "kafka: process $pid is running but $KAFKA_BROKERS is not open yet; waiting"
  fi

  until tcp_open "$KAFKA_PORT"; do
    kill -0 "$pid" 2>/dev/null || kafka_fail "the broker (pid $pid) exited during start-up"
    deadline_passed && kafka_fail "$KAFKA_BROKERS not open after ${TIMEOUT}s"
    sleep 0.2
  done
  until kafka_answers; do
    kill -0 "$pid" 2>/dev/null || kafka_fail "the broker (pid $pid) exited during start-up"
    deadline_passed && kafka_fail "$KAFKA_BROKERS does not answer a metadata request after ${TIMEOUT}s"
    sleep 0.5
  done
  log "kafka: up ($KAFKA_BROKERS, pid $pid)"
}

kafka_down() {
  local pid i
  if ! pid="$(kafka_pid)"; then
    log "kafka: not running"
    rm -f "$KAFKA_PIDFILE"
    return 0
  fi
  log "kafka: stopping pid $pid"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 600; i++)); do  # up to 60 s for a controlled shutdown
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "kafka: pid $pid did not stop in 60s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  fi
  rm -f "$KAFKA_PIDFILE"
  log "kafka: stopped"
}

# ---------------------------------------------------------------------------------------------

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  up)
    DEADLINE=$((SECONDS + TIMEOUT))
    pg_up
    kafka_up
    ;;
  down)
    kafka_down
    pg_down
    ;;
  env)
    printf 'export CLAW_KAFKA_BROKERS=%s CLAW_DATABASE_URL=%s\n' "$KAFKA_BROKERS" "$DATABASE_URL"
    ;;
  status)
    rc=0
    if pg_answers; then echo "postgres: up ($DATABASE_URL)"; else echo "postgres: down"; rc=3; fi
    if pid="$(kafka_pid)" && tcp_open "$KAFKA_PORT"; then
      echo "kafka: up ($KAFKA_BROKERS, pid $pid)"
    elif pid="$(kafka_pid)"; then
      echo "kafka: starting (pid $pid, $KAFKA_BROKERS not open yet)"; rc=3
    elif tcp_open "$KAFKA_PORT"; then
      echo "kafka: up ($KAFKA_BROKERS is open; not started from $SERVICES_DIR)"
    else
      echo "kafka: down"; rc=3
    fi
    exit "$rc"
    ;;
  clean-tests)
    # What earlier test runs left: their databases (claw_test_*) and topics (claw.test.*).
    # A database an autovacuum worker is visiting cannot always be dropped at once: try again,
    # and leave it for the next run rather than fail this one.
    for db in $(psql "$DATABASE_URL" -XtAc "SELECT datname FROM pg_database WHERE datname LIKE 'claw\_test\_%'"); do
      for attempt in 1 2 3; do
        if psql "$DATABASE_URL" -XqAc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1; then
          break
        elif [ "$attempt" = 3 ]; then
          log "could not drop $db (in use); leaving it for the next run"
        else
          sleep 1
        fi
      done
    done
    [ -f "$KAFKA_TOOLS_LOG4J" ] || kafka_write_config
    if java_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$KAFKA_BROKERS" --list | grep -q '^claw\.test\.'; then
      java_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$KAFKA_BROKERS" --delete --topic 'claw\.test\..*' >/dev/null
    fi
    log "removed earlier test databases and topics"
    ;;
  topics)
    [ -f "$KAFKA_LIBS/.complete" ] || die "kafka jars not resolved yet: run '$0 up' first"
    [ -f "$KAFKA_TOOLS_LOG4J" ] || kafka_write_config
    java_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$KAFKA_BROKERS" "$@"
    ;;
  *)
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}" >&2
    exit 2
    ;;
esac
