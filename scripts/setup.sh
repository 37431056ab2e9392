#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 host (run as root):
#  - Debian packages: bcc (python3-bpfcc), kernel headers, clang, iproute2, bpftool, perf (bench part p)
#  - /lib/modules/$(uname -r)/{build,source} pointing at Debian's headers (bcc needs them
#    at load time and this kernel ships none)
#  - bpffs mounted at /sys/fs/bpf
#  - .venv made from Debian's python3 with system site packages (so `import bcc` works),
#    with this project installed into it.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[setup] %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  echo "setup.sh must run as root (it installs Debian packages and mounts bpffs)" >&2
  exit 1
fi

APT_PKGS=(python3-bpfcc python3-venv python3-dev linux-headers-amd64 clang llvm
          iproute2 bpftool libbpf-dev linux-perf tcpdump tshark curl bird2 etcd-server etcd-client)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # wireshark-common (tshark's) asks whether non-root users may capture: no
  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Kernel headers for bcc: link the newest Debian header tree to the running kernel.
kdir="/lib/modules/$(uname -r)"
if [ ! -e "$kdir/build/include" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$hdr" ] || [ -z "$common" ]; then
    echo "no Debian kernel headers under /usr/src; is linux-headers-amd64 installed?" >&2
    exit 1
  fi
  log "linking $kdir/build -> $hdr, $kdir/source -> $common"
  mkdir -p "$kdir"
  ln -sfn "$hdr" "$kdir/build"
  ln -sfn "$common" "$kdir/source"
fi

if ! mountpoint -q /sys/fs/bpf; then
  log "mounting bpffs at /sys/fs/bpf"
  mount -t bpf bpf /sys/fs/bpf
fi

# Virtual environment from Debian's interpreter: the image's default python3 cannot see
# Debian's site-packages, where bcc lives.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import bcc' 2>/dev/null; then
  log "creating .venv from /usr/bin/python3 (system site packages)"
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -e "$stamp" ]; then
  log "installing the project into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
log "ready"
