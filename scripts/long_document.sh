#!/usr/bin/env bash
# Prints a synthetic long document (about 3,500 tokens): an archive
# inventory with one fact per section, for the main job's long-context
# questions. Deterministic, so every run asks about the same text.
set -euo pipefail
rooms=(north east south west)
colors=(red green blue amber grey violet)
echo "Inventory of the city archive, compiled by the night clerk."
echo
for i in $(seq 1 60); do
  ledger=$(( 1000 + 37 * i ))
  cabinet=$(( (i * 7) % 23 + 1 ))
  echo "Section $i. Ledger $ledger is kept in cabinet $cabinet of the ${rooms[$((i % 4))]} room," \
       "bound in ${colors[$((i % 6))]} leather. It records the harbour tolls of year $(( 1700 + i ))" \
       "and was last consulted by a visiting surveyor, who found it in good order."
done
