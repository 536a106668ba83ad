from corruptcheck.cli import main

main()
