#!/usr/bin/env bash
# vagrant/provision.sh NODE_INDEX: make this VM meshagent node n<NODE_INDEX> (Vagrant runs it as root).
#
#   1. installs the project with its own `make install` (the checkout is synced to /opt/meshagent);
#   2. on the first VM, etcd for the store: Debian's etcd.service, listening on the VM's private
#      address, configured by /etc/default/etcd as `python -m lab.etcd` writes it;
#   3. writes /etc/meshagent/agent.yaml with `python -m lab.node_config`, the writer the node lab
#      uses: node_name n<i>, node_ip 192.168.56.(10 + i), pod_cidr 10.(100 + i).0.0/24, store
#      etcd://192.168.56.11:2379;
#   4. installs and starts meshagent-agent.service.
#
# Running it again changes nothing that is already right (make install is idempotent).
set -euo pipefail

INDEX=${1:?usage: provision.sh NODE_INDEX (1, 2 or 3)}
REPO=${MESHAGENT_REPO:-/opt/meshagent}
UNDERLAY=${MESHAGENT_UNDERLAY:-192.168.56.0/24}
ETCD_INDEX=1  # etcd runs on the first VM
ETCD_DATA=/var/lib/etcd/meshagent
PY=$REPO/.venv/bin/python

step() { printf '\n== n%s: %s\n' "$INDEX" "$*"; }

cd "$REPO"
export DEBIAN_FRONTEND=noninteractive

step "installing meshagent (make install)"
make install

etcd_addr=$("$PY" -m lab.node_config address --index "$ETCD_INDEX" --underlay "$UNDERLAY")
node_addr=$("$PY" -m lab.node_config address --index "$INDEX" --underlay "$UNDERLAY")
read -r ETCD_IP _ <<< "$etcd_addr"
read -r NODE_IP POD_CIDR <<< "$node_addr"

if [ "$INDEX" = "$ETCD_INDEX" ]; then
    step "etcd on $ETCD_IP:2379 (etcd.service, /etc/default/etcd)"
    install -d -o etcd -g etcd -m 0700 "$ETCD_DATA"
    "$PY" -m lab.etcd env --name "n$INDEX" --client-ip "$ETCD_IP" --data-dir "$ETCD_DATA" > /etc/default/etcd.new
    mv /etc/default/etcd.new /etc/default/etcd
    systemctl enable etcd
    systemctl restart etcd
    for _ in $(seq 60); do
        etcdctl --endpoints="http://$ETCD_IP:2379" --dial-timeout=1s endpoint health >/dev/null 2>&1 && break
        sleep 0.5
    done
    etcdctl --endpoints="http://$ETCD_IP:2379" endpoint health
elif systemctl is-enabled --quiet etcd 2>/dev/null; then
    step "no etcd here (the package started one on localhost): stopped"
    systemctl disable --now etcd
fi

step "node config /etc/meshagent/agent.yaml: n$INDEX, $NODE_IP, pods $POD_CIDR, store etcd://$ETCD_IP:2379"
"$PY" -m lab.node_config write --index "$INDEX" --underlay "$UNDERLAY" \
    --store "etcd://$ETCD_IP:2379" --out /etc/meshagent/agent.yaml
"$PY" -c 'from agent.node_config import load; c = load("/etc/meshagent/agent.yaml"); print("config loads:", c.node_name, c.store)'

step "meshagent-agent.service"
install -m 0644 "$REPO/meshagent-agent.service" /etc/systemd/system/meshagent-agent.service
systemctl daemon-reload
systemctl enable meshagent-agent
systemctl restart meshagent-agent
for _ in $(seq 60); do meshagent status >/dev/null 2>&1 && break; sleep 1; done
if meshagent status >/dev/null 2>&1; then
    echo "n$INDEX: agent ready (meshagent status)"
else
    echo "n$INDEX: the agent is not ready yet; see: journalctl -u meshagent-agent" >&2
fi
