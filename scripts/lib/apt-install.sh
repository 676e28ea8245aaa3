# Sourced by the install scripts: apt_install PREFIX PACKAGE... installs Debian packages as root,
# or through sudo when the user is not root; says which packages need root when neither works.
apt_install() {
    local prefix="$1"; shift
    local sudo=""
    if [[ "$(id -u)" != 0 ]]; then
        command -v sudo >/dev/null || { echo "[$prefix] need root (or sudo) to apt-get install $*"; exit 1; }
        sudo="sudo"
    fi
    echo "[$prefix] apt-get install $*"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@"
}
