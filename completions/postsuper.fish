# fish completion for pymailtools postsuper(1), postqueue(1) and mailq(1): options, queue ids (from
# the queue directory when readable), ALL, "-", selectors and queue names. mailq.fish and postqueue.fish
# are links to this file (fish loads a file per command name).
# Install as ~/.config/fish/completions/postsuper.fish or in a vendor_completions.d directory.

function __pymailtools_queue_ids
    set -l dir
    for cfg in $PYMAILTOOLS_CONFIG /etc/pymailtools/config.toml
        test -r "$cfg"; or continue
        set -l line (string match -r -- '^\s*queue_directory\s*=\s*["\']([^"\']+)' < $cfg)
        if test (count $line) -ge 2
            set dir $line[2]
            break
        end
    end
    if test -z "$dir"
        if test (id -u) -eq 0; or test -d /var/spool/pymailtools
            set dir /var/spool/pymailtools
        else if set -q XDG_STATE_HOME
            set dir $XDG_STATE_HOME/pymailtools
        else
            set dir $HOME/.local/state/pymailtools
        end
    end
    set -l states $argv
    test (count $states) -eq 0; and set states incoming deferred hold
    for state in $states
        test -r $dir/$state -a -x $dir/$state; or continue
        for f in $dir/$state/*
            string match -qr -- '^[0-9A-Za-z]{1,32}$' (basename $f); and basename $f
        end
    end
end

complete -c postsuper -f
complete -c postsuper -s c -r -F -d 'configuration directory or file'
complete -c postsuper -s d -x -a 'ALL - (__pymailtools_queue_ids)' -d 'delete'
complete -c postsuper -s h -x -a 'ALL - (__pymailtools_queue_ids incoming deferred)' -d 'put on hold'
complete -c postsuper -s H -x -a 'ALL - (__pymailtools_queue_ids hold)' -d 'release from hold'
complete -c postsuper -s r -x -a 'ALL - (__pymailtools_queue_ids)' -d 'requeue'
complete -c postsuper -s p -d 'purge temporary files left by crashes'
complete -c postsuper -s s -d 'check the queue structure'
complete -c postsuper -s S -d 'check the queue structure'
complete -c postsuper -s v -d 'verbose: name each message'
complete -c postsuper -l from -x -d 'sender matches PATTERN'
complete -c postsuper -l to -x -d 'an undelivered recipient matches PATTERN'
complete -c postsuper -l older-than -x -a '1h 2h 6h 12h 1d 2d 3d 5d 1w' -d 'arrived more than AGE ago'
complete -c postsuper -l newer-than -x -a '1h 2h 6h 12h 1d 2d 3d 5d 1w' -d 'arrived less than AGE ago'
complete -c postsuper -l queue -x -a 'maildrop incoming active deferred hold' -d 'in this queue'
complete -c postsuper -l reason -x -d 'a deferral reason matches PATTERN'
complete -c postsuper -n 'not string match -q -- "-*" (commandline -ct)' -a 'hold incoming active deferred maildrop' -d 'queue'

complete -c postqueue -f
complete -c postqueue -s c -r -F -d 'configuration directory or file'
complete -c postqueue -s f -d 'flush: attempt every queued message now'
complete -c postqueue -s i -x -a '(__pymailtools_queue_ids)' -d 'attempt this message now'
complete -c postqueue -s j -d 'list the queue as JSON lines'
complete -c postqueue -s p -d 'list the queue like mailq'
complete -c postqueue -s s -x -a '(__fish_print_hostnames)' -d 'attempt the messages for this site now'
complete -c postqueue -s v -d 'verbose'
complete -c postqueue -l plain -d 'with -p: Postfix text even on a terminal'
complete -c postqueue -l from -x -d 'sender matches PATTERN'
complete -c postqueue -l to -x -d 'an undelivered recipient matches PATTERN'
complete -c postqueue -l older-than -x -a '1h 2h 6h 12h 1d 2d 3d 5d 1w' -d 'arrived more than AGE ago'
complete -c postqueue -l newer-than -x -a '1h 2h 6h 12h 1d 2d 3d 5d 1w' -d 'arrived less than AGE ago'
complete -c postqueue -l queue -x -a 'maildrop incoming active deferred hold' -d 'in this queue'
complete -c postqueue -l reason -x -d 'a deferral reason matches PATTERN'

complete -c mailq -f
complete -c mailq -s C -r -F -d 'configuration file'
complete -c mailq -l plain -d 'Postfix text even on a terminal'
complete -c mailq -l json -d 'one JSON object per message, as postqueue -j'
complete -c mailq -l explain -x -a '(__pymailtools_queue_ids)' -d 'one message and its delivery attempts'
complete -c mailq -l from -x -d 'sender matches PATTERN'
complete -c mailq -l to -x -d 'an undelivered recipient matches PATTERN'
complete -c mailq -l older-than -x -a '1h 2h 6h 12h 1d 2d 3d 5d 1w' -d 'arrived more than AGE ago'
complete -c mailq -l newer-than -x -a '1h 2h 6h 12h 1d 2d 3d 5d 1w' -d 'arrived less than AGE ago'
complete -c mailq -l queue -x -a 'maildrop incoming active deferred hold' -d 'in this queue'
complete -c mailq -l reason -x -d 'a deferral reason matches PATTERN'
