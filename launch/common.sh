# Shared by the launch scripts (sourced, not run): the dry-run switch and command printing.
# DRY_RUN=1 in the environment, or --dry_run as a script's first argument, prints every command instead of
# running it, quoted so that it can be pasted into a shell.

PYTHON=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}

quote() {  # Arguments -> one string a shell splits back into them: plain words as they are, others in '...'.
  local arg out=()
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+=("$arg")
    else
      out+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  printf '%s' "${out[*]}"
}

run() {  # Runs a command, or prints it under DRY_RUN=1.
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%s\n' "$(quote "$@")"
  else
    "$@"
  fi
}
