// The cost of one small loopback TCP send on this machine (issue 26 item 3; results in
// docs/performance.md). gcc -O2 -pthread -o sendcost loadgen/sendcost.c
//   ./sendcost SIZE CALLS NODELAY [GAP_US [SOCKETS]]
// SOCKETS connected loopback pairs (default 1); one reader thread on CPU 1 drains them all
// through epoll, as the generator's receiving thread does. The sender on CPU 0 measures its
// own CPU time per send() call.
//   GAP_US 0: sends back to back, round robin over the sockets (the reader stays awake).
//   GAP_US > 0: every GAP_US (busy wait) one burst of one send to each socket, so the
//   reader is asleep at the first send of a burst; SOCKETS 1 is one send per GAP_US.
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <pthread.h>
#include <sched.h>
#include <time.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <sys/socket.h>
#include <sys/epoll.h>
static int ep;
static void pin(int c){cpu_set_t s;CPU_ZERO(&s);CPU_SET(c,&s);pthread_setaffinity_np(pthread_self(),sizeof s,&s);}
static void *reader(void *a){pin(1);char b[65536];struct epoll_event ev[256];int open=*(int*)a;
  while(open>0){int n=epoll_wait(ep,ev,256,-1);for(int i=0;i<n;i++){ssize_t r=read(ev[i].data.fd,b,sizeof b);if(r==0){close(ev[i].data.fd);open--;}}}return 0;}
static double now(clockid_t c){struct timespec t;clock_gettime(c,&t);return t.tv_sec*1e9+t.tv_nsec;}
int main(int argc,char**argv){
  int size=argc>1?atoi(argv[1]):100; long n=argc>2?atol(argv[2]):1000000; int nodelay=argc>3?atoi(argv[3]):1;
  int gap=argc>4?atoi(argv[4]):0; int k=argc>5?atoi(argv[5]):1;
  int l=socket(AF_INET,SOCK_STREAM,0);struct sockaddr_in a={.sin_family=AF_INET,.sin_addr.s_addr=htonl(INADDR_LOOPBACK)};
  bind(l,(void*)&a,sizeof a);listen(l,1024);socklen_t al=sizeof a;getsockname(l,(void*)&a,&al);
  ep=epoll_create1(0);int *s=calloc(k,sizeof(int));
  for(int i=0;i<k;i++){s[i]=socket(AF_INET,SOCK_STREAM,0);if(connect(s[i],(void*)&a,sizeof a)){perror("connect");return 1;}
    int r=accept(l,0,0);struct epoll_event e={.events=EPOLLIN,.data.fd=r};epoll_ctl(ep,EPOLL_CTL_ADD,r,&e);
    int one=nodelay;setsockopt(s[i],IPPROTO_TCP,TCP_NODELAY,&one,sizeof one);}
  pthread_t t;int open=k;pthread_create(&t,0,reader,&open);pin(0);
  char buf[65536];memset(buf,'x',sizeof buf);
  for(long i=0;i<n/10;i++) send(s[i%k],buf,size,0); // warm
  if(!gap){
    double w0=now(CLOCK_MONOTONIC),c0=now(CLOCK_THREAD_CPUTIME_ID);
    for(long i=0;i<n;i++) if(send(s[i%k],buf,size,0)!=size){perror("send");return 1;}
    double w1=now(CLOCK_MONOTONIC),c1=now(CLOCK_THREAD_CPUTIME_ID);
    printf("size %d sockets %d calls %ld back to back: wall %.0f ns/call, sender cpu %.0f ns/call\n",size,k,n,(w1-w0)/n,(c1-c0)/n);
  } else {
    double tot=0,first=0;long bursts=n/k;
    for(long b=0;b<bursts;b++){double t=now(CLOCK_MONOTONIC)+gap*1e3;while(now(CLOCK_MONOTONIC)<t){}
      double c0=now(CLOCK_THREAD_CPUTIME_ID),cf=0;
      for(int i=0;i<k;i++){if(send(s[i],buf,size,0)!=size){perror("send");return 1;}if(!i)cf=now(CLOCK_THREAD_CPUTIME_ID);}
      double c1=now(CLOCK_THREAD_CPUTIME_ID);tot+=c1-c0;first+=cf-c0;}
    printf("size %d sockets %d calls %ld in bursts of %d every %d us: sender cpu %.0f ns/call (first of a burst %.0f ns)\n",size,k,bursts*k,k,gap,tot/(bursts*k),first/bursts);
  }
  for(int i=0;i<k;i++) shutdown(s[i],SHUT_WR);
  pthread_join(t,0);return 0;}
