from rollwire.cli import main

main()
