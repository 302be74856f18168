#!/usr/bin/env bash
# Installs the real registries waypost's tests run against, plus the build tools the
# backends need, on Debian bookworm. Idempotent: a second run installs nothing.
#
#   ZooKeeper 3.8  (bookworm `zookeeper`, run with the system Java)
#   etcd 3.4       (bookworm `etcd-server`, `etcd-client`)
#   Consul 1.8.7   (bullseye `consul`, from a bullseye suite pinned low)
#   Curator 5.4    (bookworm `libcurator-recipes-java`: the reference client the lock and
#                   election interop tests run against ours)
#   protoc         (bookworm `protobuf-compiler` + `libprotobuf-dev` for the well-known
#                   .proto files etcd-client imports) and pkg-config
#
# The bullseye suite reuses the archive URI already configured on this machine
# (/etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list): no mirror host is
# written here. It is pinned at priority 100 so nothing but what we ask for comes from it.
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

have_all() {
  [ -f /usr/share/java/zookeeper.jar ] || ls /usr/share/java/zookeeper*.jar >/dev/null 2>&1 || return 1
  command -v java >/dev/null || return 1
  command -v etcd >/dev/null || [ -x /usr/bin/etcd ] || return 1
  command -v etcdctl >/dev/null || return 1
  command -v consul >/dev/null || return 1
  command -v protoc >/dev/null || return 1
  ls /usr/share/java/curator-recipes*.jar >/dev/null 2>&1 || return 1
  [ -f /usr/include/google/protobuf/descriptor.proto ] || return 1
  command -v pkg-config >/dev/null || return 1
}

if have_all; then
  echo "install-servers: zookeeper, etcd, consul, protoc already installed"
  exit 0
fi

# The archive URI of the main Debian suite configured here.
debian_uri() {
  local f=/etc/apt/sources.list.d/debian.sources
  if [ -f "$f" ]; then
    # deb822: the URIs line of the first stanza whose Suites line names bookworm (not -security).
    awk '
      /^[[:space:]]*$/ { if (uri != "" && main) { print uri; exit } uri=""; main=0; next }
      /^URIs:/ { uri=$2 }
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == "bookworm") main=1 }
      END { if (uri != "" && main) print uri }
    ' "$f" | head -n1
    return
  fi
  if [ -f /etc/apt/sources.list ]; then
    awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }' /etc/apt/sources.list
  fi
}

need_bullseye=0
command -v consul >/dev/null || need_bullseye=1

if [ "$need_bullseye" = 1 ] && [ ! -f /etc/apt/sources.list.d/waypost-bullseye.sources ]; then
  uri="$(debian_uri)"
  if [ -z "$uri" ]; then
    echo "install-servers: cannot find the Debian archive URI in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list" >&2
    exit 1
  fi
  keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  $SUDO tee /etc/apt/sources.list.d/waypost-bullseye.sources >/dev/null <<SRC
Types: deb
URIs: ${uri}
Suites: bullseye
Components: main
Signed-By: ${keyring}
SRC
  $SUDO tee /etc/apt/preferences.d/waypost-bullseye >/dev/null <<'PIN'
# Only consul is wanted from bullseye; everything else stays on bookworm.
Package: *
Pin: release n=bullseye
Pin-Priority: 100
PIN
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends \
  zookeeper libcurator-recipes-java etcd-server etcd-client protobuf-compiler libprotobuf-dev pkg-config
if [ "$need_bullseye" = 1 ]; then
  $SUDO apt-get install -y -q --no-install-recommends consul
fi

# The Debian packages enable and start system services where an init system runs;
# tests start their own servers on free ports, so stop any that came up.
for svc in zookeeper etcd consul; do
  if command -v systemctl >/dev/null && systemctl is-active --quiet "$svc" 2>/dev/null; then
    $SUDO systemctl stop "$svc" || true
  fi
done

have_all || { echo "install-servers: something is still missing after install" >&2; exit 1; }
echo "install-servers: done ($(etcd --version 2>/dev/null | head -n1); consul $(consul version 2>/dev/null | head -n1))"
