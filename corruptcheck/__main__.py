from corruptcheck.cli.app import main

main()
