# Shell helpers shared by cluster/build.sh and cluster/images.sh (sourced, not run).

log() { printf '\033[1m>> %s\033[0m\n' "$*" >&2; }
elapsed() { printf '%dm%02ds' $(((SECONDS - $1) / 60)) $(((SECONDS - $1) % 60)); }

# apt_install PACKAGE=VERSION...: install Debian packages without starting their services (a
# packaged Prometheus would otherwise listen on all interfaces on a machine with systemd).
apt_install() {
  local policy=/usr/sbin/policy-rc.d added_policy=""
  local sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null && $sudo chmod +x "$policy"
    added_policy=1
  fi
  if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
    log "apt-get update"; $sudo apt-get update -q
  fi
  log "installing from Debian: $*"
  local ok=0
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" || ok=$?
  if [[ $ok -ne 0 ]]; then
    log "pinned Debian versions unavailable; refreshing and installing the archive's candidates"
    $sudo apt-get update -q
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${@%%=*}"
  fi
  [[ -z $added_policy ]] || $sudo rm -f "$policy"
}
