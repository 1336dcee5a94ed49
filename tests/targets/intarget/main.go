// Go target for tests/test_intarget_e2e.py: loop N / gate N FILE, calling main.work.
package main

import (
	"fmt"
	"os"
	"strconv"
	"time"
)

var sink int

//go:noinline
func work(x int) int {
	sink += x
	return x*3 + 1
}

func main() {
	n, _ := strconv.Atoi(os.Args[2])
	if os.Args[1] == "gate" {
		fmt.Println("ready")
		for {
			if _, err := os.Stat(os.Args[3]); err == nil {
				break
			}
			time.Sleep(time.Millisecond)
		}
	}
	s := 0
	for i := 0; i < n; i++ {
		s += work(i)
	}
	fmt.Printf("sum=%d\n", s)
}
