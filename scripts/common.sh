# shellcheck shell=bash
# Shared by scripts/demo and scripts/test (sourced, not run): root check, Debian packages,
# the Rust toolchain. Everything here is idempotent, so re-running a script costs seconds.

# Prints one numbered step so a reader can follow what the script is doing.
step() { printf '\n==> %s\n' "$*"; }

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "$0 must run as root: it installs packages and uses loop devices, mounts and FUSE" >&2
    exit 1
  fi
}

# Debian packages (the list lives in .ci/install-deps), then FUSE, which nbdfuse needs.
install_deps() {
  "$REPO/.ci/install-deps"
  if [ ! -e /dev/fuse ]; then
    command -v modprobe >/dev/null || apt-get install -y -qq --no-install-recommends kmod
    modprobe fuse || true
  fi
  if [ ! -e /dev/fuse ]; then
    echo "/dev/fuse is missing and 'modprobe fuse' did not create it" >&2
    exit 1
  fi
}

# The workspace needs Rust >= 1.80 with rustfmt and clippy. Debian 12's cargo is older, so a
# missing or old toolchain is installed with rustup (the official installer).
ensure_rust() {
  [ -d "$HOME/.cargo/bin" ] && export PATH="$HOME/.cargo/bin:$PATH"
  if ! rust_recent_enough; then
    step "installing the Rust toolchain with rustup"
    if ! command -v rustup >/dev/null; then
      command -v curl >/dev/null || apt-get install -y -qq --no-install-recommends curl ca-certificates
      curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
        sh -s -- -y --profile minimal --default-toolchain stable -c rustfmt -c clippy
      export PATH="$HOME/.cargo/bin:$PATH"
    else
      rustup toolchain install stable --profile minimal -c rustfmt -c clippy
      rustup default stable
    fi
  fi
  if command -v rustup >/dev/null; then
    cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
    cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
  fi
  cargo --version
}

rust_recent_enough() {
  command -v cargo >/dev/null || return 1
  local minor
  minor=$(cargo --version | sed -n 's/^cargo 1\.\([0-9]*\).*/\1/p')
  [ -n "$minor" ] && [ "$minor" -ge 80 ]
}
