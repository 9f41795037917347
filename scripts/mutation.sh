#!/usr/bin/env bash
# Mutation testing of the core modules with mutmut (3.x), one file at a time, on that file's fast tests.
#
#   scripts/mutation.sh                      # every file below, smallest first
#   scripts/mutation.sh advantages data      # only these (names from the table below)
#
# Not part of CI: a full run takes hours on 2 cores. Each file is mutated in its own scratch copy of the
# working tree ($MUTATION_WORKDIR/<name>, default /tmp/r3l-mutation), whose pyproject.toml gets a
# [tool.mutmut] section naming that file (only_mutate) and its tests (pytest_add_cli_args_test_selection),
# so a partial run still leaves complete per-file results (benchmarks/ and experiments/ are copied too: test_packing.py
# and test_countdown_operators.py import scripts from them). A file's result is in
# $MUTATION_WORKDIR/<name>/mutants/mutmut-cicd-stats.json; the script prints one line per file:
#   <file> killed=<k> survived=<s> no_tests=<n> timeout=<t> total=<N> score=<(k+t)/(N-skipped)>
# List a file's survivors with `cd $MUTATION_WORKDIR/<name> && mutmut results`, show one with
# `mutmut show <mutant>`. Needs `pip install mutmut` (3.x). Scores and the date are in docs/mutation.md.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORKDIR="${MUTATION_WORKDIR:-/tmp/r3l-mutation}"
NICE="${MUTATION_NICE:-19}"

# name -> "source file|fast test files" (smallest source first). losses leaves out test_loss_regression.py:
# its three 3-step fits take 30-65 s each, i.e. minutes per mutant; test_losses.py pins the same formulas.
declare -A TARGETS=(
  [advantages]="r3l_lightning/advantages.py|tests/test_advantages.py"
  [reflection]="r3l_lightning/explore/reflection.py|tests/test_reflection_schema.py tests/test_reflection_informative.py tests/test_properties.py"
  [trajectory]="r3l_lightning/trajectory.py|tests/test_trajectory.py tests/test_properties.py"
  [data]="r3l_lightning/data.py|tests/test_data.py tests/test_packing.py"
  [countdown]="r3l_lightning/envs/countdown.py|tests/test_env_countdown.py tests/test_countdown_operators.py tests/test_properties.py"
  [losses]="r3l_lightning/losses.py|tests/test_losses.py"
  [r3l]="r3l_lightning/explore/r3l.py|tests/test_r3l_rules.py tests/test_fidelity.py tests/test_properties.py"
)
ORDER=(advantages reflection trajectory data countdown losses r3l)

names=("$@")
[ ${#names[@]} -eq 0 ] && names=("${ORDER[@]}")
for name in "${names[@]}"; do
  if [ -z "${TARGETS[$name]+set}" ]; then
    echo "scripts/mutation.sh: unknown target '$name'; use one of: ${ORDER[*]}" >&2
    exit 2
  fi
done

python -c "import mutmut" 2>/dev/null || { echo "scripts/mutation.sh: mutmut is not installed (pip install mutmut)" >&2; exit 2; }

for name in "${names[@]}"; do
  source_file="${TARGETS[$name]%%|*}"
  tests="${TARGETS[$name]#*|}"
  dir="$WORKDIR/$name"
  rm -rf "$dir" && mkdir -p "$dir"
  # the working tree as git sees it (tracked and untracked, not ignored files)
  (cd "$ROOT" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | tar -xf - -C "$dir"
  test_list=$(printf '"%s", ' $tests)
  cat >>"$dir/pyproject.toml" <<EOF

[tool.mutmut]
source_paths = ["r3l_lightning"]
only_mutate = ["$source_file"]
also_copy = ["benchmarks", "experiments"]
pytest_add_cli_args_test_selection = [${test_list%, }]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-x"]
EOF
  echo "== $name: $source_file on $tests ($(date -u +%H:%M:%S))"
  # One OpenMP/MKL thread: mutmut forks a child per mutant, and a child forked after torch started its OpenMP
  # pool waits forever on that pool (softmax, matmul), a hang mutmut would count as a timeout, i.e. a kill.
  (cd "$dir" && OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n "$NICE" python -m mutmut run --max-children 1 \
    >mutmut.log 2>&1) \
    || echo "   mutmut exited with $? (see $dir/mutmut.log)"
  (cd "$dir" && python -m mutmut export-cicd-stats >/dev/null && python - "$source_file" <<'EOF'
import json, sys
s = json.load(open("mutants/mutmut-cicd-stats.json"))
tested = s["total"] - s.get("skipped", 0)
score = (s["killed"] + s.get("timeout", 0)) / tested if tested else 0.0
print(f"{sys.argv[1]} killed={s['killed']} survived={s['survived']} no_tests={s.get('no_tests', 0)} "
      f"timeout={s.get('timeout', 0)} total={s['total']} score={score:.1%}")
EOF
  )
done
