# fish completion for pymailtools sendmail(1).
#
# Options are parsed like Postfix's sendmail: getopt string
# A:B:C:F:GIL:N:O:R:UV:X:b:ce:f:h:imno:p:r:q:tvx, no argument permutation (the first
# recipient ends the options) and "--" ends them too.  Recipients complete as user names.
# Install as ~/.config/fish/completions/sendmail.fish or in a vendor_completions.d directory.

# True while options may still follow: no "--" and no recipient before the cursor.
function __pymailtools_sendmail_options_open
    set -l words (commandline -opc)
    set -e words[1]
    set -l argopts A B C F L N O R V X b e f h o p r
    set -l pending 0
    for word in $words
        if test $pending -eq 1
            set pending 0
            continue
        end
        if test "$word" = --
            return 1
        end
        if not string match -qr -- '^-.' $word
            return 1
        end
        if string match -q -- '-q*' $word
            continue
        end
        # a bundle: an argument option takes the rest of the word, or the next word
        for i in (seq 2 (string length -- $word))
            set -l c (string sub -s $i -l 1 -- $word)
            if contains -- $c $argopts
                if test $i -eq (string length -- $word)
                    set pending 1
                end
                break
            end
        end
    end
    return 0
end

set -l open '__pymailtools_sendmail_options_open'

complete -c sendmail -f
complete -c sendmail -a '(__fish_complete_users)'

# -A: -Am, -Ac
complete -c sendmail -n $open -s A -x -a 'm\t"ignored" c\t"ignored"' -d 'ignored (Sendmail configuration choice)'
complete -c sendmail -n $open -s B -x -a '7BIT 8BITMIME' -d 'message body type'
# -b: modes
complete -c sendmail -n $open -s b -x -d 'operating mode' -a '
    m\t"read a message and queue it (default)"
    p\t"list the mail queue like mailq"
    v\t"print where each recipient would be delivered"
    s\t"SMTP on stdin/stdout (not implemented yet)"
    d\t"SMTP listener daemon (not implemented yet)"
    D\t"SMTP listener in the foreground (not implemented yet)"
    i\t"check the alias files"
    h\t"ignored: exit at once"
    H\t"ignored: exit at once"'
complete -c sendmail -n $open -s C -r -F -d 'alternate configuration file'
complete -c sendmail -n $open -s c -d 'ignored'
complete -c sendmail -n $open -s e -x -d 'ignored'
complete -c sendmail -n $open -s F -x -d 'sender full name'
complete -c sendmail -n $open -s f -x -a '(__fish_complete_users)' -d 'envelope sender'
complete -c sendmail -n $open -s G -d 'gateway (relay) submission'
complete -c sendmail -n $open -s h -x -d 'ignored (hop count)'
complete -c sendmail -n $open -s I -d 'check the alias files'
complete -c sendmail -n $open -s i -d 'a line with only a dot does not end the message'
complete -c sendmail -n $open -s L -x -d 'ignored (syslog label)'
complete -c sendmail -n $open -s m -d 'ignored'
complete -c sendmail -n $open -s N -x -d 'delivery status notification' -a '
    never\t"no notification"
    success\t"notify on delivery"
    failure\t"notify on failure"
    delay\t"notify on delay"
    delay,failure\t"the default"'
complete -c sendmail -n $open -s n -d 'ignored'
complete -c sendmail -n $open -s O -x -d 'ignored (option=value)'
# -o: -oi, -odb, -odi, -odq, -oem
complete -c sendmail -n $open -s o -x -d 'Sendmail option' -a '
    i\t"a line with only a dot does not end the message"
    db\t"deliver in the background (default)"
    di\t"deliver in the foreground before exiting"
    dq\t"only queue the message"
    em\t"ignored: errors always show in the exit status"'
complete -c sendmail -n $open -s p -x -d 'ignored (protocol)'
# -q alone runs the queue; -qIqueueid and -qRsite restrict the run.  Declared as old-style
# options so that fish does not offer bundles such as -qt, which Postfix does not accept.
complete -c sendmail -n $open -o q -d 'run the queue once in the foreground'
complete -c sendmail -n $open -o qI -d 'run only the message with this queue id'
complete -c sendmail -n $open -o qR -d 'run only the messages for this site'
complete -c sendmail -n $open -s R -x -a 'hdrs full' -d 'what a bounce returns'
complete -c sendmail -n $open -s r -x -a '(__fish_complete_users)' -d 'envelope sender (same as -f)'
complete -c sendmail -n $open -s t -d 'take recipients from the To, Cc and Bcc headers'
complete -c sendmail -n $open -s U -d 'ignored (initial submission)'
complete -c sendmail -n $open -s V -x -d 'DSN envelope id'
complete -c sendmail -n $open -s v -d 'deliver in the foreground and print a summary'
complete -c sendmail -n $open -s X -r -F -d 'ignored (log file)'
complete -c sendmail -n $open -s x -d 'ignored'
