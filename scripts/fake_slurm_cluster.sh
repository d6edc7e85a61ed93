#!/bin/bash
# (The tested recipe of ../shared/reference/cluster-engines.md §1.B, used by the fleet tests;
# `down` here also waits for the daemons and kills stragglers.)
# Bring up a self-contained fake multi-node Slurm cluster on ONE host (as root),
# with its own munged (own socket/key), N slurmd "nodes" and fake GPUs.
# Usage: [SLURM_EXTRA_CONF=lines] fake_slurm_cluster.sh up DIR [NODES=3] [GPUS_PER_NODE=2] [BASEPORT=17100]
#        fake_slurm_cluster.sh down DIR
# Then:  export SLURM_CONF=DIR/etc/slurm.conf ; srun -N3 --gres=gpu:1 cmd
# Needs: apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge
set -euo pipefail
cmd=${1:?up|down}; D=$(realpath -m "${2:?dir}")

if [ "$cmd" = down ]; then
  # TERM each daemon by its pidfile, then KILL what is still there after 5 s (slurmctld can
  # hang in shutdown on an agent thread to a dead slurmd).
  pids=$(cat "$D"/run/*.pid 2>/dev/null || true)
  for pid in $pids; do kill "$pid" 2>/dev/null || true; done
  for _ in $(seq 50); do
    alive=""; for pid in $pids; do kill -0 "$pid" 2>/dev/null && alive="$alive $pid"; done
    [ -z "$alive" ] && exit 0
    sleep 0.1
  done
  for pid in $alive; do kill -9 "$pid" 2>/dev/null || true; done
  exit 0
fi

NODES=${3:-3}; GPUS=${4:-2}; BASE=${5:-17100}
mkdir -p "$D"/{etc,run,log,state,spool,dev,munge}
chmod 755 "$D/munge"

# --- munge: private key + private socket, so it never clashes with a system munged
dd if=/dev/urandom of="$D/munge/munge.key" bs=1k count=1 status=none
chmod 400 "$D/munge/munge.key"
munged --socket="$D/munge/munge.sock" --key-file="$D/munge/munge.key" \
       --pid-file="$D/run/munged.pid" --log-file="$D/log/munged.log" \
       --seed-file="$D/munge/munged.seed" --force

# --- fake GPU device files: symlinks to /dev/null are enough (slurmd stat()s
# them and wants a char/block device; plain files => no CUDA_VISIBLE_DEVICES)
for ((g=0; g<GPUS; g++)); do ln -sf /dev/null "$D/dev/nvidia$g"; done

NCPU=$(nproc)
{
cat <<EOF
ClusterName=fake
SlurmctldHost=localhost
SlurmctldPort=$BASE
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$D/munge/munge.sock
MailProg=/bin/true
GresTypes=gpu
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmdTimeout=30
EOF
# lines of the caller's (e.g. HealthCheckProgram=… HealthCheckInterval=…), one per line
[ -n "${SLURM_EXTRA_CONF:-}" ] && printf '%s\n' "$SLURM_EXTRA_CONF"
for ((i=1; i<=NODES; i++)); do
  echo "NodeName=n$i NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((BASE+i)) CPUs=$NCPU RealMemory=1000 Gres=gpu:$GPUS State=UNKNOWN"
done
echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
} > "$D/etc/slurm.conf"
cat > "$D/etc/gres.conf" <<EOF
AutoDetect=off
NodeName=n[1-$NODES] Name=gpu File=$D/dev/nvidia[0-$((GPUS-1))]
EOF

export SLURM_CONF="$D/etc/slurm.conf"
slurmctld -i
for ((i=1; i<=NODES; i++)); do mkdir -p "$D/spool/n$i"; slurmd -N "n$i"; done

# wait until all nodes are idle
for _ in $(seq 100); do
  [ "$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)" = "$NODES" ] && exit 0
  sleep 0.2
done
echo "cluster did not become idle" >&2; sinfo -N >&2; exit 1
