#!/usr/bin/env bash
# Multi-node launch: run this same command on every node (torchrun, c10d rendezvous).
#   NNODES=2 MASTER_ADDR=node0 NPROC=8 CONFIG=configs/gpu_1b.yaml launch/run_multinode.sh
# Extra arguments are dotted config overrides for `python -m randlift_dist.train`.
#
# Environment:
#   NNODES       nodes in the job (required; MIN:MAX for an elastic job, checked at rendezvous only)
#   MASTER_ADDR  host name or address of the node holding the rendezvous store, reachable from all
#   MASTER_PORT  rendezvous port on it (default 29400); RDZV_ID: a job id shared by all nodes
#                (default randlift; use a new one per job)
#   NPROC        processes on this node (default: the GPUs, or 2 on a CPU machine)
#   LOCAL_ADDR   this node's address as the others reach it (default: resolved from the host
#                name; set it when the host name resolves to an address the others cannot use)
#   IS_HOST      1 on the node that hosts the rendezvous store, 0 on the others (default: torchrun
#                guesses from MASTER_ADDR and the host name; set it when nodes share a host name)
#   GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME  the interface for collectives (else the host name's)
#   MAX_RESTARTS, RDZV_JOIN_TIMEOUT, CONFIG  as in launch/run.sh
# NODE_RANK is not needed: the c10d rendezvous numbers the nodes (ranks follow join order).
#
# Everything else is launch/run.sh (randlift-launch): preflight for NNODES x NPROC ranks before
# torchrun, restarts decided from the workers' exit codes that resume from the latest checkpoint,
# the agent's messages in <run.dir>/torchrun-<host>.log, one message on failure. The nodes agree on
# each attempt through the rendezvous store: MAX_RESTARTS counts restarts of the whole job, and a
# final error on one node (status 2 or 3) ends every node's launcher with it. A node whose
# processes died can be started again with the same command: the other nodes' workers fail, their
# launchers start the next attempt and wait (RDZV_JOIN_TIMEOUT) for it, and it joins that attempt.
# The node hosting the rendezvous store (MASTER_ADDR) must stay up: if it dies, start the whole
# job again (it resumes from the latest checkpoint).
set -euo pipefail
: "${NNODES:?set NNODES to the number of nodes}"
: "${MASTER_ADDR:?set MASTER_ADDR to the rendezvous host (the node with IS_HOST=1), reachable from every node}"
exec bash "$(dirname "${BASH_SOURCE[0]}")/run.sh" "$@"
