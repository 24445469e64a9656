"""python -m hcm.data.synthetic --out DIR [...]: write the synthetic benchmark (--help)."""

from hcm.data.synthetic.dataset import main

if __name__ == "__main__":
    main()
