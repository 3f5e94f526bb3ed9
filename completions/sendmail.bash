# bash completion for pymailtools sendmail(1)                    -*- shell-script -*-
#
# Options are parsed like Postfix's sendmail: getopt string
# A:B:C:F:GIL:N:O:R:UV:X:b:ce:f:h:imno:p:r:q:tvx, no argument permutation (the first
# recipient ends the options) and "--" ends them too.  Recipients complete as user names.
# Install as /usr/share/bash-completion/completions/sendmail.

_pymailtools_sendmail()
{
    local cur prev word i j c
    cur=${COMP_WORDS[COMP_CWORD]}
    prev=""

    # Options whose argument may be the next word (Postfix's getopt string; -q takes none
    # when it stands alone, as in Postfix).
    local argopts="ABCFLNORVXbefhopr"

    # Walk the words before the cursor: stop offering options after "--" or a recipient,
    # and find the option whose separate argument is being completed, if any.
    local options_done=0 pending=""
    for ((i = 1; i < COMP_CWORD; i++)); do
        word=${COMP_WORDS[i]}
        if [[ -n $pending ]]; then
            pending=""
            continue
        fi
        if [[ $word == -- ]]; then
            options_done=1
            break
        fi
        if [[ $word != -?* ]]; then
            options_done=1
            break
        fi
        [[ $word == -q* ]] && continue
        # A bundle such as -it or -if: an argument option consumes the rest of the word,
        # or the next word when it is last.
        for ((j = 1; j < ${#word}; j++)); do
            c=${word:j:1}
            if [[ $argopts == *"$c"* ]]; then
                ((j == ${#word} - 1)) && pending=$c
                break
            fi
        done
    done
    [[ -n $pending ]] && prev=-$pending

    case $prev in
        -C | -X)
            compopt -o filenames 2>/dev/null
            mapfile -t COMPREPLY < <(compgen -f -- "$cur")
            return
            ;;
        -N)
            # A comma list: complete the last item.
            local head="" item=$cur
            if [[ $cur == *,* ]]; then
                head=${cur%,*},
                item=${cur##*,}
            fi
            mapfile -t COMPREPLY < <(compgen -P "$head" -W "never success failure delay" -- "$item")
            compopt -o nospace 2>/dev/null
            return
            ;;
        -R)
            mapfile -t COMPREPLY < <(compgen -W "hdrs full" -- "$cur")
            return
            ;;
        -B)
            mapfile -t COMPREPLY < <(compgen -W "7BIT 8BITMIME" -- "$cur")
            return
            ;;
        -b)
            mapfile -t COMPREPLY < <(compgen -W "m p v s d D i h H" -- "$cur")
            return
            ;;
        -o)
            mapfile -t COMPREPLY < <(compgen -W "i db di dq em" -- "$cur")
            return
            ;;
        -A)
            mapfile -t COMPREPLY < <(compgen -W "m c" -- "$cur")
            return
            ;;
        -f | -r)
            mapfile -t COMPREPLY < <(compgen -u -- "$cur")
            return
            ;;
        -?)
            # -F full name, -V envid, -L label, -O opt, -h count, -e x, -p proto: free text.
            return
            ;;
    esac

    if ((!options_done)) && [[ $cur == -* ]]; then
        local opts
        case $cur in
            -b*) opts="-bm -bp -bv -bs -bd -bD -bi -bh -bH" ;;
            -o*) opts="-odb -odi -odq -oi -oem" ;;
            -q*) opts="-q -qI -qR" ;;
            -N*) opts="-Nnever -Nsuccess -Nfailure -Ndelay" ;;
            -R*) opts="-Rhdrs -Rfull" ;;
            -B*) opts="-B7BIT -B8BITMIME" ;;
            -A*) opts="-Am -Ac" ;;
            *)
                opts="-Am -Ac -B -bm -bp -bv -bs -bd -bD -bi -bh -bH -C -c -e -F -f -G -h -I -i
                      -L -m -N -n -O -o -odb -odi -odq -oi -oem -p -q -qI -qR -R -r -t -U -V -v
                      -X -x --"
                ;;
        esac
        mapfile -t COMPREPLY < <(compgen -W "$opts" -- "$cur")
        return
    fi

    # Recipients: local user names (a comma list completes its last item).
    local head="" item=$cur
    if [[ $cur == *,* ]]; then
        head=${cur%,*},
        item=${cur##*,}
    fi
    mapfile -t COMPREPLY < <(compgen -P "$head" -u -- "$item")
} &&
    complete -F _pymailtools_sendmail sendmail

# ex: filetype=sh
