# Sourced by the scripts that need Debian packages (deps.sh, fleettest.sh, imagetest.sh, vmtest.sh,
# bench.sh, .ci/run), so that each says what it is missing the same way.
#
# install_packages WHO PACKAGE... installs the packages from Debian when we are root on a machine with
# apt-get, and otherwise says which are missing and how to install them, and fails. Nothing to install is
# success. WHO names the caller in what it prints.
install_packages() {
	local who=$1
	shift
	[ $# -gt 0 ] || return 0
	if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
		echo "$who: needs these Debian packages: $*" >&2
		echo "install them with: sudo apt-get install -y $*" >&2
		return 1
	fi
	echo "$who: installing $*" >&2
	DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
