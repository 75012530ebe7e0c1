from edgeformer.cli import main

main()
