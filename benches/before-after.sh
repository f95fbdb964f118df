#!/usr/bin/env bash
# Recovery and API figures of two builds side by side, in one run: `trainvisor bench --only
# recovery,api` of BEFORE and AFTER, alternated ROUNDS times (so drift in the machine's load
# hits both), then the median of each figure per build, written as JSON and printed as a
# table. Used for the launcher-seam redesign (issue 12) and the honest seams (issue 22, with
# ONLY=recovery,api,accounting for the heartbeat's latency and throughput): BEFORE is the
# commit before the change.
#
#   [ONLY=SCENARIOS] benches/before-after.sh BEFORE_BIN AFTER_BIN [OUT.json] [ROUNDS]
set -euo pipefail
before=$1 after=$2 out=${3:-bench-results/redesign.json} rounds=${4:-2} only=${ONLY:-recovery,api}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for i in $(seq 1 "$rounds"); do
  for which in before after; do
    bin=$before; [ "$which" = after ] && bin=$after
    echo "before-after: round $i, $which" >&2
    "$bin" bench --only "$only" --out "$tmp/$which-$i.json" >/dev/null
  done
done
python3 - "$tmp" "$out" "$rounds" <<'PY'
import json, statistics, sys
tmp, out, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
runs = {w: [json.load(open(f"{tmp}/{w}-{i}.json")) for i in range(1, rounds + 1)] for w in ("before", "after")}
def median(w, k):
    vals = [r["figures"][k] for r in runs[w] if r["figures"].get(k) is not None]
    return statistics.median(vals) if vals else None
keys = sorted(set(runs["before"][0]["figures"]) & set(runs["after"][0]["figures"]))
table = {k: {"before": median("before", k), "after": median("after", k)} for k in keys}
json.dump({"rounds": rounds, "machine": runs["after"][0].get("machine"), "figures": table},
          open(out, "w"), indent=2)
print(f"| figure (median of {rounds} runs) | before | after | after / before |")
print("|---|---|---|---|")
for k, v in table.items():
    b, a = v["before"], v["after"]
    ratio = f"{a / b:.2f}" if b and a is not None else "–"
    print(f"| `{k}` | {b:.2f} | {a:.2f} | {ratio} |")
PY
