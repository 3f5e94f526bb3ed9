# bash completion for pymailtools smtpchat(1)                    -*- shell-script -*-
#
# smtpchat [option ...] [host [port]]: options may come anywhere (click parses them).
# Install as /usr/share/bash-completion/completions/smtpchat.

_pymailtools_smtpchat()
{
    local cur prev
    cur=${COMP_WORDS[COMP_CWORD]}
    prev=${COMP_WORDS[COMP_CWORD-1]}

    local opts="--server -s --port -p --pop3 --imap --command --mx --resolver -4 -6 --local-interface -li --to -t
        --from -f --ehlo --helo -h --tls --tls-optional -tlso --tls-on-connect -tlsc
        --tls-verify --tls-ca-path --tls-cert --tls-key --tls-sni --auth -a --auth-user -au
        --auth-password -ap --auth-plaintext --show-secrets --header --add-header -ah --subject --body
        --attach --data -d --no-data-fixup -ndf --raw-line --bare-lf --bare-cr --quit-after -q
        --pipeline --chunking --chunk-size --smtputf8 --timeout --suppress-data -n --json
        --no-prompt --version --help"

    case $prev in
        --quit-after|-q)
            COMPREPLY=($(compgen -W "connect banner first-ehlo first-helo ehlo helo lhlo tls
                starttls auth mail from rcpt to data" -- "$cur"))
            return
            ;;
        --auth|-a)
            # The type is optional: offer the types, and the options after a bare --auth.
            if [[ $cur == -* ]]; then
                COMPREPLY=($(compgen -W "$opts" -- "$cur"))
            else
                COMPREPLY=($(compgen -W "PLAIN LOGIN CRAM-MD5 USER XOAUTH2" -- "$cur"))
            fi
            return
            ;;
        --tls-ca-path|--tls-cert|--tls-key|--attach|--data|-d|--body)
            COMPREPLY=($(compgen -f -- "$cur"))
            return
            ;;
        --server|-s|--resolver)
            COMPREPLY=($(compgen -A hostname -- "$cur"))
            return
            ;;
        --port|-p)
            COMPREPLY=($(compgen -W "25 465 587 110 995 143 993 smtp submission submissions
                pop3 pop3s imap imaps" -- "$cur"))
            return
            ;;
        --to|-t|--from|-f|--ehlo|--helo|-h|--local-interface|-li|--tls-sni|--auth-user|-au|\
        --auth-password|-ap|--header|--add-header|-ah|--subject|--raw-line|--chunk-size|\
        --timeout|--command)
            return
            ;;
    esac

    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    else
        COMPREPLY=($(compgen -A hostname -- "$cur"))
    fi
}
complete -F _pymailtools_smtpchat smtpchat
