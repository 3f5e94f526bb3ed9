"""mailq: placeholder until the queue listing lands."""


def main() -> int:
    from pymailtools.cli.sendmail import main as sendmail_main

    return sendmail_main(["mailq", "-bp"])
