# fish completion for pymailtools postmap(1) and postalias(1): options, table types and files.
# postalias.fish is a link to this file (fish loads a file per command name).
# Install as ~/.config/fish/completions/postmap.fish or in a vendor_completions.d directory.

for cmd in postmap postalias
    complete -c $cmd -s c -x -a '(__fish_complete_directories)' -d 'configuration directory (ignored)'
    complete -c $cmd -s f -d 'do not fold keys to lower case'
    complete -c $cmd -s N -d 'ignored (Postfix: NUL-terminated keys)'
    complete -c $cmd -s n -d 'ignored (Postfix: keys without NUL)'
    complete -c $cmd -s o -d 'ignored (Postfix: keep root privileges)'
    complete -c $cmd -s p -d 'index with default permissions'
    complete -c $cmd -s q -x -a '-' -d 'print the value of KEY (- : keys from stdin)'
    complete -c $cmd -s r -d 'do not warn about duplicate keys'
    complete -c $cmd -s s -d 'print every entry'
    complete -c $cmd -s v -d 'ignored (verbose)'
    complete -c $cmd -s w -d 'do not warn about duplicate keys'
    complete -c $cmd -a 'hash: lmdb: texthash: regexp: pcre: inline: static:' -d 'table type'
end
