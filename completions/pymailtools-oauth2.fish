# fish completion for pymailtools-oauth2(1): subcommands, their options, providers and files.
# Install as ~/.config/fish/completions/pymailtools-oauth2.fish or in vendor_completions.d.

set -l cmd pymailtools-oauth2
complete -c $cmd -f
complete -c $cmd -n __fish_use_subcommand -a authorize -d 'sign in (device flow), store the refresh token'
complete -c $cmd -n __fish_use_subcommand -a token -d 'print a valid access token'
complete -c $cmd -n '__fish_seen_subcommand_from authorize token' -l account -x -d 'account name'
complete -c $cmd -n '__fish_seen_subcommand_from authorize token' -l store -r -F -d 'token store file'
complete -c $cmd -n '__fish_seen_subcommand_from authorize' -l provider -x -a 'google microsoft custom' -d 'provider preset'
complete -c $cmd -n '__fish_seen_subcommand_from authorize' -l client-id -x -d 'OAuth2 client id'
complete -c $cmd -n '__fish_seen_subcommand_from authorize' -l client-secret-command -x -a '(__fish_complete_command)' -d 'command printing the client secret'
complete -c $cmd -n '__fish_seen_subcommand_from authorize' -l device-endpoint -x -d 'device authorization URL'
complete -c $cmd -n '__fish_seen_subcommand_from authorize' -l token-endpoint -x -d 'token URL'
complete -c $cmd -n '__fish_seen_subcommand_from authorize' -l scope -x -d 'scopes, space separated'
complete -c $cmd -n '__fish_seen_subcommand_from authorize' -l tenant -x -d 'Microsoft tenant (default common)'
complete -c $cmd -n '__fish_seen_subcommand_from authorize' -l ca-file -r -F -d 'trusted CA certificates (PEM)'
complete -c $cmd -n '__fish_seen_subcommand_from token' -l json -d 'print JSON with expires_in'
