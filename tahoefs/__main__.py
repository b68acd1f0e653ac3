from tahoefs.cli.main import main

main()
