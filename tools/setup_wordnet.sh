#!/usr/bin/env bash
# WordNet 3.0 for the open-ended lexical evaluation (openseg/evaluation/lexical.py,
# tools/build_lexical_vocab.py), offline and idempotent.
#
# Source: Debian's `wordnet-base` + `wordnet-sense-index` packages (Princeton WordNet 3.0,
# installed into /usr/share/wordnet). nltk's WordNet reader needs the files *copied* into
# <NLTK_DATA>/corpora/wordnet (it refuses symlinks out of its data dirs) plus the
# `lexnames` file that Debian leaves out; this script does both.
#
# Target: $OPENSEG_NLTK_DATA, else $OPENSEG_CACHE/nltk_data, else ~/.cache/openseg/nltk_data.
# Print the target on the last line; export NLTK_DATA=<it> (openseg.evaluation.lexical also
# looks there by itself).
set -euo pipefail
source_dir=/usr/share/wordnet
target_root="${OPENSEG_NLTK_DATA:-${OPENSEG_CACHE:-$HOME/.cache/openseg}/nltk_data}"
target="$target_root/corpora/wordnet"

if [ ! -f "$source_dir/data.noun" ] || [ ! -f "$source_dir/index.sense" ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "tools/setup_wordnet.sh: $source_dir lacks WordNet 3.0; run as root or install the" \
         "Debian packages wordnet-base and wordnet-sense-index." >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base wordnet-sense-index >/dev/null
fi

if [ ! -f "$target/lexnames" ] || [ "$source_dir/data.noun" -nt "$target/data.noun" ]; then
  mkdir -p "$target"
  for file in "$source_dir"/*; do
    [ -f "$file" ] && cp -f "$file" "$target/"
  done
  # The 45 lexicographer files of WordNet 3.0 (lexnames(5WN)): number, name, syntactic category.
  names=(adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute
    noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group
    noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant
    noun.possession noun.process noun.quantity noun.relation noun.shape noun.state
    noun.substance noun.time verb.body verb.change verb.cognition verb.communication
    verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion
    verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl)
  : > "$target/lexnames.tmp"
  for index in "${!names[@]}"; do
    name="${names[$index]}"
    case "$name" in
      noun.*) pos=1 ;; verb.*) pos=2 ;; adj.*) pos=3 ;; adv.*) pos=4 ;;
    esac
    printf '%02d\t%s\t%s\n' "$index" "$name" "$pos" >> "$target/lexnames.tmp"
  done
  mv "$target/lexnames.tmp" "$target/lexnames"
fi
echo "$target_root"
