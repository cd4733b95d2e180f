# Tab completion of Hydra overrides for the experiment scripts, in bash:
#     source experiments/completion.bash
#     .venv/bin/python experiments/train.py method=res<TAB>
# Hydra's own script (`-sc install=bash`) completes a command typed as `python` only: with `.venv/bin/python` it
# calls `.venv/bin/python -sc query=bash`, which fails. This one takes any python and hands Hydra the line in the
# form its query parses (`python <script> <overrides>`).
_reslora_hydra_completion() {
    local words=($COMP_LINE)
    (( ${#words[@]} >= 2 )) && [[ -f ${words[1]} ]] && grep -q "@hydra.main" "${words[1]}" || return
    local rest=${COMP_LINE#*"${words[1]}"}
    local choices
    choices=$(COMP_POINT=$COMP_POINT COMP_LINE="python ${words[1]}$rest" "${words[0]}" "${words[1]}" -sc query=bash)
    COMPREPLY=($(compgen -o nospace -o default -W "$choices" -- "${words[COMP_CWORD]}"))
}
COMP_WORDBREAKS=${COMP_WORDBREAKS//=}
complete -o nospace -o default -F _reslora_hydra_completion python python3
