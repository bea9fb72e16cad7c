from nvit.cli import main

main()
