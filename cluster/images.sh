#!/usr/bin/env bash
# Build (or find cached) the operator and trainer images for the local cluster, with Debian's
# podman/buildah and a Python base image made locally from Debian with mmdebstrap, and write
# containerd-importable archives of them (docs/packaging.md, "make images").
#
# Images are content-addressed: the tag is a hash of exactly what goes into them (the Dockerfile,
# every file of the build context after .dockerignore, and the base image's recipe below), so an
# unchanged tree builds nothing. Everything lives under $CACHE_DIR: the podman storage (with its
# layer cache) in containers/, the wheels pip installs from in images/wheels, the archives and
# images.env in images/.
#
# Usage: cluster/images.sh build        build or find both images; write $CACHE_DIR/images/images.env
#        cluster/images.sh env          print images.env (building first if needed)
#        cluster/images.sh hash         print the content hash of the current tree
#        cluster/images.sh files        list the files that hash covers
#        cluster/images.sh run ARGS...  `podman run` on this storage with this machine's runtime flags
#        cluster/images.sh podman ARGS  any podman command on this storage
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

CACHE_DIR="${CACHE_DIR:-$HOME/.cache/finetune-operator}"
IMAGES="$CACHE_DIR/images"
WHEELS="$IMAGES/wheels"
ENV_FILE="$IMAGES/images.env"
KEEP_ARCHIVES=2

# The base: Debian bookworm's own CPython at /usr/bin/python3, the same path in the builder and in
# both final stages (the virtual environment copied between them links to it). Every line of this
# recipe goes into the images' hash.
BASE_SUITE=bookworm
BASE_MIRROR=http://deb.debian.org/debian
BASE_SECURITY_MIRROR=http://deb.debian.org/debian-security
BASE_PACKAGES=python3,python3-venv,python3-pip,python-is-python3,ca-certificates
BASE_CHANGES=(
  'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
  'ENV LANG=C.UTF-8'
  'CMD ["python3"]'
)
# pip in the build installs from a wheelhouse filled here for this interpreter and platform.
# (bookworm: CPython 3.11, glibc 2.36; pip does not expand a manylinux tag to the older ones).
WHEEL_PLATFORM=(--python-version 3.11 --implementation cp --abi cp311 --only-binary=:all:
                --platform manylinux1_x86_64 --platform manylinux2010_x86_64
                --platform manylinux2014_x86_64)
for glibc in {5..36}; do WHEEL_PLATFORM+=(--platform "manylinux_2_${glibc}_x86_64"); done

# This machine's container runtime: crun refuses its hybrid cgroup hierarchy, runc with cgroupfs
# works; podman's default open-files and process limits exceed the machine's hard limits.
# Storage under $CACHE_DIR; its run state on tmpfs, one directory per storage.
PODMAN=(podman --root "$CACHE_DIR/containers/storage"
        --runroot "/run/finetune-operator-containers-$(printf %s "$CACHE_DIR" | sha256sum | cut -c1-8)"
        --storage-driver overlay --runtime runc --cgroup-manager cgroupfs --events-backend file)
ULIMITS=(--ulimit nofile=4096:4096 --ulimit nproc=4096:4096)

# shellcheck source=lib.sh
source "$here/lib.sh"
pm() { "${PODMAN[@]}" "$@"; }

install_tools() {
  local missing=() tool
  for tool in podman buildah mmdebstrap runc; do
    command -v "$tool" >/dev/null || missing+=("$tool")
  done
  command -v flock >/dev/null || missing+=(util-linux)
  [[ ${#missing[@]} -eq 0 ]] || apt_install "${missing[@]}"
}

base_recipe() {
  printf 'mmdebstrap --variant=minbase --include=%s %s\n' "$BASE_PACKAGES" "$BASE_SUITE"
  printf '  deb %s %s main\n' "$BASE_MIRROR" "$BASE_SUITE" "$BASE_MIRROR" "$BASE_SUITE-updates" \
    "$BASE_SECURITY_MIRROR" "$BASE_SUITE-security"
  printf 'podman import --change %s\n' "${BASE_CHANGES[@]}"
}

# content_hash: sha256 (first 12 hex digits) of the base recipe, the Dockerfile and every file the
# build context holds after .dockerignore (Docker's rules: the last matching pattern wins, a
# pattern matches a path or any of its parent directories, `*` stays within one path element).
#
# content_hash [list | snapshot DIR]: print the hash; or list the files; or copy them into DIR (a
# private build context: files edited during a build cannot end up in an image of another hash)
# and print the hash of the copies.
content_hash() {
  BASE_RECIPE="$(base_recipe)" python3 - "$repo" "${@:-hash}" <<'PY'
import hashlib, os, re, shutil, sys

root, mode, *dest = sys.argv[1:]
rules = []
for raw in open(os.path.join(root, ".dockerignore")).read().splitlines():
    pattern = raw.strip()
    if not pattern or pattern.startswith("#"):
        continue
    include = pattern.startswith("!")
    pattern = pattern.lstrip("!").strip("/")
    regex = "".join(".*" if part == "**" else "[^/]*" if part == "*" else "[^/]" if part == "?"
                    else re.escape(part) for part in re.split(r"(\*\*|\*|\?)", pattern))
    rules.append((re.compile(regex.replace(".*/", "(.*/)?") + "$"), include))


def excluded(path):
    prefixes = ["/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 2)]
    result = False
    for regex, include in rules:
        if any(regex.match(p) for p in prefixes):
            result = not include
    return result


reincluded_dirs = {p.pattern.split("/")[0] for p, include in rules if include}
files = ["Dockerfile"]
for directory, subdirs, names in os.walk(root):
    rel = os.path.relpath(directory, root)
    rel = "" if rel == "." else rel + "/"
    # Skip trees that are excluded and that no `!` rule reaches into (.git, build outputs, ...).
    subdirs[:] = sorted(d for d in subdirs if not excluded(rel + d) or not rel and
                        any(re.match(r, d) for r in reincluded_dirs))
    files += [rel + n for n in names if not excluded(rel + n)]
if mode == "list":
    print(*sorted(set(files)), sep="\n")
    sys.exit()
digest = hashlib.sha256(os.environ["BASE_RECIPE"].encode())
for path in sorted(set(files)):
    full = os.path.join(root, path)
    if mode == "snapshot":
        os.makedirs(os.path.dirname(os.path.join(dest[0], path)), exist_ok=True)
        full = shutil.copy2(full, os.path.join(dest[0], path))
    executable = "x" if os.access(full, os.X_OK) else "-"
    digest.update(f"{path}\0{executable}\0".encode())
    digest.update(hashlib.sha256(open(full, "rb").read()).digest())
print(digest.hexdigest()[:12])
PY
}

ensure_base() {
  local tag
  tag="localhost/finetune-base:$(base_recipe | sha256sum | cut -c1-12)"
  if pm image exists "$tag"; then
    echo "$tag"; return
  fi
  local t=$SECONDS tmp; tmp=$(mktemp -d "$IMAGES/base.XXXXXX")
  log "base image $tag: mmdebstrap $BASE_SUITE minbase + $BASE_PACKAGES"
  nice mmdebstrap --quiet --variant=minbase --include="$BASE_PACKAGES" "$BASE_SUITE" "$tmp/base.tar" \
    "deb $BASE_MIRROR $BASE_SUITE main" "deb $BASE_MIRROR $BASE_SUITE-updates main" \
    "deb $BASE_SECURITY_MIRROR $BASE_SUITE-security main" >&2
  local changes=() change
  for change in "${BASE_CHANGES[@]}"; do changes+=(--change "$change"); done
  pm import --quiet "${changes[@]}" "$tmp/base.tar" "$tag" >/dev/null
  rm -rf "$tmp"
  log "base image $tag: made in $(elapsed "$t")"
  echo "$tag"
}

# requirements EXTRA: the base dependencies plus one extra, from pyproject.toml (as the Dockerfile
# reads them).
requirements() {
  python3 -c 'import sys, tomllib; p = tomllib.load(open(sys.argv[1], "rb"))["project"]
print(*p["dependencies"], *p["optional-dependencies"][sys.argv[2]], sep="\n")' \
    "$repo/pyproject.toml" "$1"
}

# The wheelhouse: every wheel both images install, downloaded once (pip keeps files already in
# --dest), so a rebuilt dependency layer does not download torch again. The index here sends no
# cacheable responses, which makes pip's own HTTP cache useless.
ensure_wheels() {
  local reqs="$IMAGES/requirements" extra
  mkdir -p "$reqs" "$WHEELS"
  for extra in operator trainer; do requirements "$extra" >"$reqs/$extra.txt"; done
  printf 'setuptools>=68\nwheel\n' >"$reqs/build.txt"
  printf '[global]\nno-index = true\nfind-links = /wheels\n' >"$IMAGES/pip.conf"
  local stamp; stamp="$WHEELS/.ok-$(cat "$reqs"/*.txt | sha256sum | cut -c1-12)"
  [[ -f $stamp ]] && return 0
  local t=$SECONDS
  log "wheelhouse $WHEELS: pip download (first run downloads torch and CUDA: a few minutes)"
  for extra in build operator trainer; do
    nice python3 -m pip download --quiet --disable-pip-version-check --dest "$WHEELS" \
      "${WHEEL_PLATFORM[@]}" -r "$reqs/$extra.txt" >&2
  done
  touch "$stamp"
  log "wheelhouse: ready in $(elapsed "$t") ($(du -sh "$WHEELS" | cut -f1))"
}

build_image() {
  local target=$1 hash=$2 base=$3
  local ref="localhost/finetune-$target:$hash" archive="$IMAGES/finetune-$target-$hash.tar"
  if ! pm image exists "$ref"; then
    if [[ -f $archive ]]; then
      log "$ref: loading the cached archive"
      pm load --quiet --input "$archive" >/dev/null
    else
      ensure_wheels
      local t=$SECONDS version
      version=$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$context/pyproject.toml")
      local build_log="$IMAGES/build-$target.log"
      log "$ref: building (target $target on $base; log: $build_log)"
      nice "${PODMAN[@]}" build --layers --pull=never --network host --runtime runc \
        "${ULIMITS[@]}" --volume "$WHEELS:/wheels:ro" --volume "$IMAGES/pip.conf:/etc/pip.conf:ro" \
        --build-arg PYTHON_IMAGE="$base" --build-arg TRAINER_BASE="$base" \
        --build-arg VERSION="$version" --label "dev.finetune.content-hash=$hash" \
        --target "$target" --tag "$ref" --file "$context/Dockerfile" "$context" >"$build_log" 2>&1 ||
        { tail -n 30 "$build_log" >&2; log "$ref: build failed, full log in $build_log"; return 1; }
      log "$ref: built in $(elapsed "$t") ($(image_size "$ref"))"
    fi
  fi
  if [[ ! -f $archive ]]; then
    local t=$SECONDS
    rm -f "$archive.partial"
    pm save --quiet --format docker-archive --output "$archive.partial" "$ref"
    mv "$archive.partial" "$archive"
    log "$archive: written in $(elapsed "$t") ($(du -h "$archive" | cut -f1))"
  fi
  touch "$archive"  # most recently used: kept by prune
  prune "$target"
}

image_size() {
  pm image inspect --format '{{.Size}}' "$1" | awk '{printf "%.0f MB", $1 / 1e6}'
}

# prune TARGET: keep the archives (and tagged images) of the KEEP_ARCHIVES most recently used
# hashes; the layer cache stays.
prune() {
  local old
  ls -1t "$IMAGES/finetune-$1-"*.tar 2>/dev/null | tail -n +$((KEEP_ARCHIVES + 1)) |
    while read -r old; do
      local hash=${old##*-}; hash=${hash%.tar}
      log "pruning finetune-$1:$hash"
      rm -f "$old"
      pm rmi --force "localhost/finetune-$1:$hash" >/dev/null 2>&1 || true
    done
}

build() {
  install_tools
  mkdir -p "$IMAGES" "$CACHE_DIR/containers"
  exec 9>"$IMAGES/.lock"
  flock 9  # one build at a time (make images and a test session may race)
  local t=$SECONDS hash base
  context=$(mktemp -d "$IMAGES/context.XXXXXX")
  trap 'rm -rf "$context"' EXIT
  hash=$(content_hash snapshot "$context")
  local operator="localhost/finetune-operator:$hash" trainer="localhost/finetune-trainer:$hash"
  local operator_tar="$IMAGES/finetune-operator-$hash.tar" trainer_tar="$IMAGES/finetune-trainer-$hash.tar"
  if ! { [[ -f $operator_tar && -f $trainer_tar ]] && pm image exists "$operator" &&
         pm image exists "$trainer"; }; then
    base=$(ensure_base)
    build_image operator "$hash" "$base"
    build_image trainer "$hash" "$base"
  else
    touch "$operator_tar" "$trainer_tar"
  fi
  cat >"$ENV_FILE.partial" <<EOF
FINETUNE_OPERATOR_IMAGE=$operator
FINETUNE_TRAINER_IMAGE=$trainer
FINETUNE_OPERATOR_ARCHIVE=$operator_tar
FINETUNE_TRAINER_ARCHIVE=$trainer_tar
EOF
  mv "$ENV_FILE.partial" "$ENV_FILE"
  log "images $hash ready in $(elapsed "$t"): $ENV_FILE"
}

case "${1:-}" in
  build) build ;;
  env) build; cat "$ENV_FILE" ;;
  hash) content_hash ;;
  files) content_hash list ;;
  run) shift; install_tools; pm run "${ULIMITS[@]}" "$@" ;;
  podman) shift; install_tools; pm "$@" ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
esac
