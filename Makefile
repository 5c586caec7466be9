# meshagent: `sudo make demo` and `sudo make test` are all a newcomer runs (README.md).
SHELL := /bin/bash
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
KVER := $(shell uname -r)

# Debian packages: BCC and its kernel-header fallback, netlink/tc tools, what tests and benches use,
# and etcd (3.4: the multi-node store, and the store tests start their own).
DEB_PACKAGES := python3-bpfcc python3-venv python3-dev linux-headers-amd64 iproute2 iptables nftables \
	bpftool util-linux procps curl netcat-openbsd iperf3 wrk haproxy gcc make etcd-server etcd-client
# The node lab and the VMs (lab/, vagrant/): its CA, ping; Vagrant to validate the VMs.
DEB_PACKAGES += python3-cryptography iputils-ping vagrant
# DNS (issue 12): dnsmasq without a system service (nothing takes port 53), the tests' outside
# world upstream and the bench's baseline.
DEB_PACKAGES += dnsmasq-base

.PHONY: install deps kernel-headers venv demo demo-down demo-multinode demo-multinode-down vagrant-validate \
	test test-unit bench lint clean

install: deps kernel-headers venv
	@ln -sfn $(VENV)/bin/meshagent /usr/local/bin/meshagent
	@mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
	@echo "meshagent installed: $$(command -v meshagent)"

deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

# No headers package matches this kernel: point BCC at Debian's generic headers (KERNEL-NOTES.md).
kernel-headers: deps
	@if [ ! -e /lib/modules/$(KVER)/build/include ]; then \
		hdr=$$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -n1); \
		common=$${hdr%-amd64}-common; \
		echo "linking kernel headers for $(KVER): $$hdr"; \
		mkdir -p /lib/modules/$(KVER); \
		ln -sfn $$hdr /lib/modules/$(KVER)/build; \
		ln -sfn $$common /lib/modules/$(KVER)/source; \
	fi

# A virtualenv from Debian's python3 with system site-packages, so it sees python3-bpfcc.
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml | deps
	@test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@$(PY) -c 'import bcc, pyroute2, click, yaml, prometheus_client, scapy, etcd3gw, cryptography, dnslib'
	@touch $@

demo: install
	@bash examples/demo.sh

demo-down: install
	@bash examples/demo.sh down

# Three nodes on this machine (lab/, etcd in the underlay): endpoints, a policy, cross-node traffic.
demo-multinode: install
	@PY=$(PY) bash examples/multinode/demo.sh

demo-multinode-down: install
	@PY=$(PY) bash examples/multinode/demo.sh down

# The Vagrant VMs cannot boot here: check their Vagrantfile and provisioning script instead.
vagrant-validate: deps
	cd vagrant && vagrant validate --ignore-provider
	bash -n vagrant/provision.sh

test: install vagrant-validate
	$(PY) -m pytest tests -v -p no:cacheprovider

test-unit: install
	$(PY) -m pytest tests/unit -q -p no:cacheprovider

bench: install
	$(PY) -m bench.run

lint: venv
	$(VENV)/bin/ruff check agent cli tests bench userspace_l7 lab

clean:
	rm -rf $(VENV) bench/bin
